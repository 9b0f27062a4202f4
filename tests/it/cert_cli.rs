//! `quicseal cert` as a real process, checked by an outside tool (the openssl CLI), and the
//! operator's loop end to end: bootstrap a PKI, connect nodes, revoke one, publish the CRL,
//! and let the running node reload it.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use quicseal::rustls::{CertificateError, Error as RustlsError};
use quicseal::{CertFiles, Error, Identity, Node, NodeConfig, TlsError, TrustStore};

const BIN: &str = env!("CARGO_BIN_EXE_quicseal");

fn quicseal(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN).current_dir(dir).arg("cert").args(args).output().unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = quicseal(dir, args);
    assert!(out.status.success(), "quicseal cert {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn openssl(dir: &Path, args: &[&str]) -> Output {
    Command::new("openssl").current_dir(dir).args(args).output().expect("the openssl CLI is installed")
}

/// A CA and nodes made by the CLI in `dir/certs` (the default directory).
fn bootstrap(dir: &Path, nodes: &[&str]) {
    ok(dir, &["init", "--name", "Test Network CA"]);
    for node in nodes {
        ok(dir, &["issue", node, "--ip", "127.0.0.1"]);
    }
}

#[test]
fn openssl_accepts_what_the_cli_writes_and_sees_the_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    bootstrap(d, &["node-a", "node-b"]);
    ok(d, &["revoke", "certs/node-b.crt", "--reason", "key-compromise"]);
    ok(d, &["crl", "--days", "7"]);
    // Certificates and chains.
    for node in ["node-a", "node-b"] {
        let v = openssl(d, &["verify", "-CAfile", "certs/ca.crt", &format!("certs/{node}.crt")]);
        assert!(v.status.success(), "{node}: {}", String::from_utf8_lossy(&v.stdout));
        let v =
            openssl(d, &["verify", "-CAfile", "certs/ca.crt", "-purpose", "sslclient", &format!("certs/{node}.crt")]);
        assert!(v.status.success());
        let v =
            openssl(d, &["verify", "-CAfile", "certs/ca.crt", "-purpose", "sslserver", &format!("certs/{node}.crt")]);
        assert!(v.status.success());
    }
    // With the CRL: node-a passes, node-b is revoked.
    let crl_check = |node: &str| {
        openssl(
            d,
            &[
                "verify",
                "-CAfile",
                "certs/ca.crt",
                "-crl_check",
                "-CRLfile",
                "certs/ca.crl",
                &format!("certs/{node}.crt"),
            ],
        )
    };
    assert!(crl_check("node-a").status.success());
    let revoked = crl_check("node-b");
    assert!(!revoked.status.success());
    let text = String::from_utf8_lossy(&revoked.stdout).to_string() + &String::from_utf8_lossy(&revoked.stderr);
    assert!(text.contains("certificate revoked"), "{text}");
    // Text dumps parse.
    let x509 = openssl(d, &["x509", "-noout", "-text", "-in", "certs/node-a.crt"]);
    assert!(x509.status.success());
    let x509 = String::from_utf8_lossy(&x509.stdout);
    assert!(x509.contains("DNS:node-a") && x509.contains("IP Address:127.0.0.1"), "{x509}");
    assert!(x509.contains("TLS Web Client Authentication") && x509.contains("TLS Web Server Authentication"));
    let ca =
        String::from_utf8_lossy(&openssl(d, &["x509", "-noout", "-text", "-in", "certs/ca.crt"]).stdout).to_string();
    assert!(ca.contains("CA:TRUE") && ca.contains("pathlen:0") && ca.contains("Certificate Sign, CRL Sign"), "{ca}");
    let crl = openssl(d, &["crl", "-noout", "-text", "-in", "certs/ca.crl"]);
    assert!(crl.status.success());
    let crl = String::from_utf8_lossy(&crl.stdout);
    assert!(crl.contains("Next Update") && crl.contains("Key Compromise"), "{crl}");
    let serial = ok(d, &["inspect", "certs/node-b.crt", "--json"]);
    let serial: serde_json::Value = serde_json::from_str(&serial).unwrap();
    let serial = serial[0]["serial"].as_str().unwrap().to_uppercase();
    assert!(crl.contains(&serial), "{serial} in {crl}");
    // The CRL is signed by the CA.
    let signed = openssl(d, &["crl", "-noout", "-in", "certs/ca.crl", "-CAfile", "certs/ca.crt"]);
    assert!(String::from_utf8_lossy(&signed.stderr).contains("verify OK"), "{signed:?}");
    // Keys are readable by their owner only, and openssl reads them.
    use std::os::unix::fs::PermissionsExt;
    for key in ["ca.key", "node-a.key", "node-b.key"] {
        let mode = std::fs::metadata(d.join("certs").join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
        assert!(openssl(d, &["pkey", "-noout", "-in", &format!("certs/{key}")]).status.success());
    }
}

#[test]
fn verify_exit_codes_from_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    bootstrap(d, &["good", "bad"]);
    ok(d, &["revoke", "certs/bad.crt"]);
    ok(d, &["crl"]);
    let code = |args: &[&str]| quicseal(d, &[&["verify"], args].concat()).status.code();
    assert_eq!(code(&["certs/good.crt", "--crl", "certs/ca.crl", "--name", "good"]), Some(0));
    assert_eq!(code(&["certs/bad.crt", "--crl", "certs/ca.crl"]), Some(4));
    assert_eq!(code(&["certs/good.crt", "--name", "evil"]), Some(5));
    let other = tempfile::tempdir().unwrap();
    ok(other.path(), &["init", "--name", "Other"]);
    let other_ca = other.path().join("certs/ca.crt");
    assert_eq!(code(&["certs/good.crt", "--ca", other_ca.to_str().unwrap()]), Some(2));
    assert_eq!(code(&["certs/missing.crt"]), Some(1));
    // A second init or issue refuses without --force, and says so.
    let again = quicseal(d, &["init", "--name", "Again"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(quicseal(d, &["issue", "good"]).status.code(), Some(1));
    assert!(quicseal(d, &["inspect", "certs/ca.crl"]).status.success());
}

fn node(d: &Path, name: &str, crl: bool) -> (Node, CertFiles) {
    let certs = d.join("certs");
    let mut files =
        CertFiles::new(certs.join(format!("{name}.crt")), certs.join(format!("{name}.key")), certs.join("ca.crt"))
            .interval(Duration::from_millis(50));
    if crl {
        files = files.crl(certs.join("ca.crl"));
    }
    let (identity, trust) = files.load().unwrap();
    let node = Node::bind("127.0.0.1:0".parse().unwrap(), NodeConfig::new(identity, trust)).unwrap();
    (node, files)
}

/// Replaces a file in one step (as editors and deploy tools do), so a poll never sees it
/// half-replaced.
fn replace(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn wait_reloads(watcher: &quicseal::CertWatcher, n: u64) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while watcher.status().reloads < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("reloaded {n} times: {:?}", watcher.status()));
}

#[tokio::test]
async fn revoke_publish_and_reload_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    bootstrap(d, &["server", "node-a", "node-b"]);
    ok(d, &["crl"]); // an empty CRL to start with
    let (server, files) = node(d, "server", true);
    let watcher = server.watch(files);
    let (a, _) = node(d, "node-a", false);
    let (b, _) = node(d, "node-b", false);
    let addr = server.local_addr().unwrap();
    let (to_server, at_server) = tokio::join!(a.connect(addr, "server"), server.accept());
    let (to_server, at_server) = (to_server.unwrap(), at_server.unwrap());
    let mut a_events = to_server.events();
    let (b_first, _) = tokio::join!(b.connect(addr, "server"), server.accept());
    b_first.unwrap().close();

    // The operator revokes node-b and publishes a new CRL; the server picks it up.
    ok(d, &["revoke", "certs/node-b.crt", "--reason", "key-compromise"]);
    ok(d, &["crl"]);
    wait_reloads(&watcher, 1).await;

    let (refused, accepted) = tokio::join!(b.connect(addr, "server"), server.accept());
    assert!(refused.is_err());
    assert!(
        matches!(
            accepted,
            Err(Error::Tls(TlsError::Local { error: RustlsError::InvalidCertificate(CertificateError::Revoked), .. }))
        ),
        "{accepted:?}"
    );
    // node-a still connects, and its established session never dropped.
    let (again, _) = tokio::join!(a.connect(addr, "server"), server.accept());
    again.unwrap();
    to_server.send(0, "still here").await.unwrap();
    assert_eq!(at_server.recv().await.unwrap().decode::<String>().unwrap(), "still here");
    assert!(a_events.try_recv().is_err(), "no session event: the session never dropped");
    assert_eq!(to_server.stats().reconnects, 0);

    // A half-written CRL keeps the last good configuration and is reported.
    let crl_path = d.join("certs/ca.crl");
    let good_crl = std::fs::read(&crl_path).unwrap();
    replace(&crl_path, &good_crl[..good_crl.len() / 2]);
    tokio::time::timeout(Duration::from_secs(10), async {
        while watcher.status().failures == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let status = watcher.status();
    assert!(status.last_error.as_deref().unwrap_or("").contains("ca.crl"), "{status:?}");
    let (still_refused, _) = tokio::join!(b.connect(addr, "server"), server.accept());
    assert!(still_refused.is_err(), "the revocation stays in force");
    let (still_ok, _) = tokio::join!(a.connect(addr, "server"), server.accept());
    still_ok.unwrap();
    assert_eq!(status.failures, 1, "the same broken contents are not retried every poll: {status:?}");
    // Undone: the files are again what the node runs on; the error clears without a reload.
    replace(&crl_path, &good_crl);
    tokio::time::timeout(Duration::from_secs(10), async {
        while watcher.status().last_error.is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(watcher.status().reloads, 1);
    // A later real change is picked up: revoke node-a too.
    ok(d, &["revoke", "certs/node-a.crt"]);
    ok(d, &["crl"]);
    wait_reloads(&watcher, 2).await;
    let (refused, _) = tokio::join!(a.connect(addr, "server"), server.accept());
    assert!(refused.is_err());
    // Established sessions keep running even for a revoked peer until they end.
    to_server.send(0, "after revocation").await.unwrap();
    assert_eq!(at_server.recv().await.unwrap().decode::<String>().unwrap(), "after revocation");
}

#[tokio::test]
async fn explicit_reload_swaps_identity_and_refuses_unusable_material() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    bootstrap(d, &["server", "client"]);
    let (server, _) = node(d, "server", false);
    let (client, _) = node(d, "client", false);
    let addr = server.local_addr().unwrap();
    let old = server.identity().fingerprint();
    // An empty trust store is refused; the node keeps working with what it had.
    let e = server.reload_trust(TrustStore::new()).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e:?}");
    let (s, _) = tokio::join!(client.connect(addr, "server"), server.accept());
    s.unwrap();
    // Renew the server's certificate with a new key and reload it explicitly: new handshakes
    // present the new key.
    ok(d, &["renew", "certs/server.crt"]);
    let identity = Identity::from_pem_files(d.join("certs/server.crt"), d.join("certs/server.key")).unwrap();
    let fresh = identity.fingerprint();
    assert_ne!(fresh, old);
    server.reload(identity, server.trust()).unwrap();
    let (s, _) = tokio::join!(client.connect(addr, "server"), server.accept());
    assert_eq!(s.unwrap().peer().fingerprint, fresh);
    // Expiry is readable: ~90 days for the node, ~10 years for the CA.
    let expiry = server.expiry();
    assert!((88..=90).contains(&expiry.certificate.days_left), "{expiry:?}");
    assert!(expiry.cas[0].days_left > 3000);
    assert!(expiry.expiring_within(Duration::from_secs(30 * 86_400)).is_empty());
    assert_eq!(expiry.expiring_within(Duration::from_secs(100 * 86_400)).len(), 1);
}

/// Asserts exit code 1 and one `error:` line on stderr containing every needle, with no panic
/// and no `Debug` dump.
fn refused(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "expected {needle:?} in {stderr}");
    }
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Error(") && !stderr.contains("configuration:"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().filter(|l| !l.contains(" WARN ")).count(), 1, "one line: {stderr}");
}

#[test]
fn errors_name_the_file_the_cause_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    bootstrap(d, &["a"]);
    std::fs::write(d.join("afile"), b"x").unwrap();
    refused(&quicseal(d, &["init", "--name", "CA", "--out", "afile"]), &["--out afile: not a directory"]);
    std::fs::create_dir(d.join("adir")).unwrap();
    refused(
        &quicseal(d, &["renew", "certs/a.crt", "--key", "adir"]),
        &["--key adir: is a directory", "give the key file"],
    );
    // Garbage inside PEM armour, and no PEM at all.
    std::fs::write(d.join("garbage.pem"), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    std::fs::write(d.join("noise.pem"), "not pem at all\n").unwrap();
    refused(
        &quicseal(d, &["inspect", "garbage.pem"]),
        &["garbage.pem: a CERTIFICATE section does not hold a valid X.509"],
    );
    refused(&quicseal(d, &["inspect", "noise.pem"]), &["noise.pem: no certificate or CRL in it"]);
    // verify: bad input exits 1, never a verdict of 2.
    refused(&quicseal(d, &["verify", "garbage.pem"]), &["garbage.pem: certificate 1 of the file is not a valid X.509"]);
    refused(&quicseal(d, &["verify", "noise.pem"]), &["noise.pem"]);
    refused(
        &quicseal(d, &["verify", "certs/a.crt", "--name", "not a name!"]),
        &["--name: not a DNS name, an IP address or a SPIFFE ID", "\"not a name!\""],
    );
    // A CA certificate given as a node's: a sentence, not `Other(OtherError(CaUsedAsEndEntity))`.
    let out = quicseal(d, &["verify", "certs/ca.crt"]);
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("a CA certificate was presented as a node certificate") && !stdout.contains("Other("),
        "{stdout}"
    );
    // --json: the verdict as an object.
    let out = quicseal(d, &["verify", "certs/a.crt", "--name", "a", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["valid"].as_bool(), v["exit_code"].as_u64()), (Some(true), Some(0)));
    let out = quicseal(d, &["verify", "certs/a.crt", "--name", "b", "--json"]);
    assert_eq!(out.status.code(), Some(5));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["valid"].as_bool(), v["exit_code"].as_u64()), (Some(false), Some(5)));
}

#[test]
fn dangerous_issuance_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    refused(&quicseal(d, &["init", "--name", ""]), &["--name is empty"]);
    refused(&quicseal(d, &["init", "--name", "  "]), &["--name is empty"]);
    // --ca-dir is accepted by init too, like the other commands; --key-type names the algorithm.
    ok(d, &["init", "--name", "Short CA", "--days", "30", "--ca-dir", "short", "--key-type", "ed25519"]);
    refused(
        &quicseal(d, &["issue", "n", "--ca-dir", "short"]),
        &["--days 90: the certificate would outlive the CA", "--days 29"],
    );
    refused(&quicseal(d, &["issue", "n", "--ca-dir", "short", "--days", "0"]), &["out of range"]);
    let issued = ok(d, &["issue", "n", "--ca-dir", "short", "--days", "20"]);
    refused(&quicseal(d, &["renew", "short/n.crt", "--ca-dir", "short", "--days", "31"]), &["would outlive the CA"]);
    // revoke --serial: only a serial this CA directory issued, unless --force.
    refused(
        &quicseal(d, &["revoke", "--serial", "abcdef", "--ca-dir", "short"]),
        &["serial abcdef was never issued", "--force"],
    );
    ok(d, &["revoke", "--serial", "abcdef", "--ca-dir", "short", "--force"]);
    let serial = issued.split("(serial ").nth(1).and_then(|s| s.split(')').next()).unwrap();
    ok(d, &["revoke", "--serial", serial, "--ca-dir", "short"]);
    let revoked = std::fs::read_to_string(d.join("short/revoked")).unwrap();
    assert!(revoked.contains("abcdef ") && revoked.contains(&format!("{serial} ")), "{revoked}");
    // The CRL and the issued list agree with openssl.
    ok(d, &["crl", "--ca-dir", "short"]);
    let out = openssl(d, &["crl", "-in", "short/ca.crl", "-noout", "-text"]);
    let bare = serial.strip_prefix("00").unwrap_or(serial).to_uppercase();
    assert!(String::from_utf8_lossy(&out.stdout).to_uppercase().contains(&bare));
}

/// `cert issue --spiffe-id` makes an X.509-SVID (the ID as the one URI SAN, no DNS SAN), openssl
/// reads it as such, and `cert verify --name spiffe://...` checks it as a dialler would.
#[test]
fn the_cli_issues_and_verifies_x509_svids() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["init", "--name", "SPIFFE test CA"]);
    let id = "spiffe://example.org/ns/default/sa/node-b";
    ok(d, &["issue", "node-b", "--spiffe-id", id]);
    let text = openssl(d, &["x509", "-in", "certs/node-b.crt", "-noout", "-ext", "subjectAltName,keyUsage"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("URI:{id}")) && !text.contains("DNS:"), "{text}");
    assert!(text.contains("Digital Signature") && !text.contains("Certificate Sign"), "{text}");
    let verify = |name: &str| quicseal(d, &["verify", "certs/node-b.crt", "--name", name]);
    let out = verify(id);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    for (name, why) in [
        ("spiffe://example.org/ns/default/sa/other", "not an X.509-SVID for spiffe://example.org/ns/default/sa/other"),
        ("node-b", "not valid for"),
    ] {
        let out = verify(name);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(5), "{name}: wrong name is exit 5: {stdout}");
        assert!(stdout.contains(why), "{name}: {stdout}");
    }
    // Bad input is exit 1 and names the problem.
    let out = verify("spiffe://Example.org/x");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a SPIFFE ID"));
    for args in [
        &["issue", "node-c", "--spiffe-id", "spiffe://example.org/a/"][..],
        &["issue", "node-c", "--spiffe-id", "spiffe://example.org/a", "--uri", "spiffe://example.org/b"],
    ] {
        let out = quicseal(d, args);
        assert!(!out.status.success(), "{args:?}");
        assert!(!d.join("certs/node-c.crt").exists(), "{args:?}: nothing written");
    }
}
