//! `quicseal cert` in-process: each subcommand's files, modes, refusals and messages.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use std::time::SystemTime;

use quicseal::pki::{CaDir, NodeCert};

use super::*;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: CertCommand,
}

/// Runs `quicseal cert ARGS...` in-process; returns (exit code or error, stdout).
fn cert(args: &[&str]) -> (crate::Result<u8>, String) {
    let cli = Cli::try_parse_from(std::iter::once("cert").chain(args.iter().copied())).expect("arguments parse");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let r = run(CertArgs { command: cli.command }, &mut out, &mut err);
    (r, String::from_utf8(out).unwrap())
}

fn ok(args: &[&str]) -> String {
    let (r, out) = cert(args);
    assert_eq!(r.unwrap(), 0, "{args:?}: {out}");
    out
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_issue_write_0600_keys_and_refuse_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    ok(&["init", "--name", "Test CA", "--out", d]);
    assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
    assert_eq!(mode(&dir.path().join("ca.crt")), 0o644);
    let before = std::fs::read(dir.path().join("ca.key")).unwrap();
    let (r, _) = cert(&["init", "--name", "Other", "--out", d]);
    assert!(fails_with(&r, |m| m.contains("--force")));
    assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), before, "nothing replaced");
    ok(&["issue", "a", "--ip", "127.0.0.1", "--uri", "spiffe://t/a", "--ca-dir", d]);
    assert_eq!(mode(&dir.path().join("a.key")), 0o600);
    let (r, _) = cert(&["issue", "a", "--ca-dir", d]);
    assert!(fails_with(&r, |m| m.contains("a.crt: already exists")));
    for bad in ["../escape", ".hidden", "a/b", ""] {
        let (r, _) = cert(&["issue", bad, "--ca-dir", d]);
        assert!(fails_with(&r, |m| m.contains("names the files")), "{bad:?}");
    }
    ok(&["issue", "a", "--ca-dir", d, "--force", "--client-only", "--no-default-san", "--dns", "a.example"]);
    let chain = quicseal::load_certificates(dir.path().join("a.crt")).unwrap();
    assert_eq!(chain.len(), 2, "leaf then CA");
    let peer = quicseal::PeerIdentity::from_certificate(&chain[0]).unwrap();
    assert_eq!(peer.dns_names, ["a.example"]);
    // --force replaced the CA? No: only `init --force` does.
    ok(&["init", "--name", "Replaced", "--out", d, "--force"]);
    assert_ne!(std::fs::read(dir.path().join("ca.key")).unwrap(), before);
    // No temporary files left behind.
    let stray: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".quicseal-"))
        .collect();
    assert!(stray.is_empty());
}

#[test]
fn renew_refuses_a_ca_a_foreign_key_and_a_compromised_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    ok(&["init", "--name", "CA", "--out", d]);
    let (ca_crt, ca_key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
    let before = (std::fs::read(&ca_crt).unwrap(), std::fs::read(&ca_key).unwrap());
    let (r, _) = cert(&["renew", ca_crt.to_str().unwrap(), "--ca-dir", d]);
    assert!(fails_with(&r, |m| m.contains("is a CA certificate")));
    let (r, _) = cert(&["renew", ca_crt.to_str().unwrap(), "--ca-dir", d, "--reuse-key"]);
    assert!(r.is_err());
    assert_eq!((std::fs::read(&ca_crt).unwrap(), std::fs::read(&ca_key).unwrap()), before, "the CA is untouched");
    // Issuance from the CA still works, and openssl agrees it is still a CA.
    ok(&["issue", "a", "--ca-dir", d]);
    ok(&["issue", "b", "--ca-dir", d]);
    let out = std::process::Command::new("openssl")
        .args(["verify", "-CAfile", ca_crt.to_str().unwrap(), dir.path().join("a.crt").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // --reuse-key with another certificate's key.
    let (a_crt, b_key) = (dir.path().join("a.crt"), dir.path().join("b.key"));
    let (r, _) =
        cert(&["renew", a_crt.to_str().unwrap(), "--ca-dir", d, "--reuse-key", "--key", b_key.to_str().unwrap()]);
    assert!(fails_with(&r, |m| m.contains("is not the key of")));
    // A key revoked for compromise is not certified again; a new key is fine.
    ok(&["revoke", a_crt.to_str().unwrap(), "--ca-dir", d, "--reason", "key-compromise"]);
    let (r, _) = cert(&["renew", a_crt.to_str().unwrap(), "--ca-dir", d, "--reuse-key"]);
    assert!(fails_with(&r, |m| m.contains("key compromise")));
    ok(&["renew", a_crt.to_str().unwrap(), "--ca-dir", d]);
    // The same key under another certificate: revoking one certificate for key compromise
    // refuses the key under the other too.
    let (b_crt, b_old) = (dir.path().join("b.crt"), dir.path().join("b-old.crt"));
    std::fs::copy(&b_crt, &b_old).unwrap();
    ok(&["renew", b_crt.to_str().unwrap(), "--ca-dir", d, "--reuse-key"]);
    ok(&["revoke", b_old.to_str().unwrap(), "--ca-dir", d, "--reason", "key-compromise"]);
    let (r, _) = cert(&["renew", b_crt.to_str().unwrap(), "--ca-dir", d, "--reuse-key"]);
    assert!(fails_with(&r, |m| m.contains("key compromise")), "{r:?}");
}

#[test]
fn clear_errors_for_a_missing_ca_a_foreign_key_and_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (r, _) = cert(&["issue", "a", "--ca-dir", d]);
    assert!(fails_with(&r, |m| m.contains("ca.crt") && m.contains("cannot read the CA")));
    ok(&["init", "--name", "CA", "--out", d]);
    std::fs::remove_file(dir.path().join("ca.key")).unwrap();
    let (r, _) = cert(&["issue", "a", "--ca-dir", d]);
    assert!(fails_with(&r, |m| m.contains("ca.key")));
    // A key that does not belong to the CA certificate.
    let other = tempfile::tempdir().unwrap();
    ok(&["init", "--name", "Other", "--out", other.path().to_str().unwrap()]);
    std::fs::copy(other.path().join("ca.key"), dir.path().join("ca.key")).unwrap();
    let (r, _) = cert(&["issue", "a", "--ca-dir", d]);
    assert!(fails_with(&r, |m| m.contains("does not match")));
    // inspect on garbage and on a key.
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, b"\x00\x01 not pem at all").unwrap();
    let (r, _) = cert(&["inspect", garbage.to_str().unwrap()]);
    assert!(fails_with(&r, |m| m.contains("no certificate or CRL")));
    let (r, _) = cert(&["inspect", dir.path().join("ca.key").to_str().unwrap()]);
    assert!(r.is_err());
    let (r, _) = cert(&["inspect", dir.path().join("missing.crt").to_str().unwrap()]);
    assert!(fails_with(&r, |m| m.contains("missing.crt")));
    // revoke (or renew) something the CA did not issue.
    ok(&["issue", "x", "--ca-dir", other.path().to_str().unwrap()]);
    let third = tempfile::tempdir().unwrap();
    let t = third.path().to_str().unwrap();
    ok(&["init", "--name", "Third", "--out", t]);
    let x = other.path().join("x.crt");
    let (r, _) = cert(&["revoke", x.to_str().unwrap(), "--ca-dir", t]);
    assert!(fails_with(&r, |m| m.contains("was not issued by")));
    let (r, _) = cert(&["renew", x.to_str().unwrap(), "--ca-dir", t]);
    assert!(fails_with(&r, |m| m.contains("was not issued by")));
    let (r, _) = cert(&["revoke", "--serial", "zz", "--ca-dir", t]);
    assert!(fails_with(&r, |m| m.contains("hex")));
}

#[test]
fn inspect_a_chain_and_a_crl_and_verify_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    ok(&["init", "--name", "Test CA", "--out", d]);
    ok(&["issue", "good", "--ca-dir", d]);
    ok(&["issue", "bad", "--ca-dir", d]);
    let out = ok(&["inspect", &p("good.crt")]);
    assert!(
        out.contains("subject       CN=good") && out.contains("DNS:good") && out.contains("CA certificate"),
        "{out}"
    );
    assert!(out.contains("serverAuth, clientAuth") && out.contains("ECDSA P-256"), "{out}");
    assert!(out.contains("days_left     89") || out.contains("days_left     90"), "{out}");
    let json: serde_json::Value = serde_json::from_str(&ok(&["inspect", &p("good.crt"), "--json"])).unwrap();
    assert_eq!(json[0]["subject"], "CN=good");
    assert_eq!(json[1]["type"], "CA certificate");
    assert_eq!(json[0]["fingerprint"].as_str().unwrap().len(), 64);
    // Revoke one, publish the CRL, inspect it.
    ok(&["revoke", &p("bad.crt"), "--ca-dir", d, "--reason", "key-compromise"]);
    assert!(ok(&["revoke", &p("bad.crt"), "--ca-dir", d]).contains("already revoked"));
    ok(&["crl", "--ca-dir", d]);
    let crl: serde_json::Value = serde_json::from_str(&ok(&["inspect", &p("ca.crl"), "--json"])).unwrap();
    assert_eq!(crl["type"], "CRL");
    let bad_serial = serde_json::from_str::<serde_json::Value>(&ok(&["inspect", &p("bad.crt"), "--json"])).unwrap()[0]
        ["serial"]
        .clone();
    assert_eq!(crl["revoked"], serde_json::json!([bad_serial]));
    // verify: good, revoked, wrong name, wrong CA, expired.
    let verify = |args: &[&str]| cert(&[&["verify"], args].concat()).0.unwrap();
    let (ca, crl) = (p("ca.crt"), p("ca.crl"));
    assert_eq!(verify(&[&p("good.crt"), "--ca", &ca, "--crl", &crl]), 0);
    assert_eq!(verify(&[&p("good.crt"), "--ca", &ca, "--name", "good"]), 0);
    assert_eq!(verify(&[&p("bad.crt"), "--ca", &ca, "--crl", &crl]), 4);
    assert_eq!(verify(&[&p("bad.crt"), "--ca", &ca]), 0, "without the CRL it is not known to be revoked");
    assert_eq!(verify(&[&p("good.crt"), "--ca", &ca, "--name", "other"]), 5);
    let other = tempfile::tempdir().unwrap();
    ok(&["init", "--name", "Other CA", "--out", other.path().to_str().unwrap()]);
    assert_eq!(verify(&[&p("good.crt"), "--ca", other.path().join("ca.crt").to_str().unwrap()]), 2);
    let ca_dir = CaDir::open(dir.path()).unwrap();
    let ca_obj = ca_dir.ca();
    let past = SystemTime::now() - 10 * DAY;
    let expired = ca_obj.issue(&NodeCert::new("old").dns("old").validity(past - DAY, past)).unwrap();
    std::fs::write(dir.path().join("old.crt"), &expired.chain_pem).unwrap();
    assert_eq!(verify(&[&p("old.crt"), "--ca", &ca]), 3);
    let out = ok(&["inspect", &p("old.crt")]);
    assert!(out.contains("warning       EXPIRED"), "{out}");
    let (r, _) = cert(&["verify", &p("missing.crt"), "--ca", &ca]);
    assert!(r.is_err(), "an unreadable file is an error (exit 1), not a verdict");
}

#[test]
fn renew_keeps_the_names_with_a_new_or_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    ok(&["init", "--name", "CA", "--out", d]);
    ok(&["issue", "n", "--ip", "10.1.2.3", "--ca-dir", d, "--days", "10"]);
    let crt = dir.path().join("n.crt");
    let read = || {
        let c = quicseal::load_certificates(&crt).unwrap();
        quicseal::PeerIdentity::from_certificate(&c[0]).unwrap()
    };
    let before = read();
    ok(&["renew", crt.to_str().unwrap(), "--ca-dir", d, "--reuse-key"]);
    let same = read();
    assert_eq!(same.fingerprint, before.fingerprint);
    assert!(same.not_after > before.not_after + 70 * DAY);
    assert_eq!(
        (same.dns_names.clone(), same.ip_addresses.clone()),
        (before.dns_names.clone(), before.ip_addresses.clone())
    );
    ok(&["renew", crt.to_str().unwrap(), "--ca-dir", d]);
    let fresh = read();
    assert_ne!(fresh.fingerprint, before.fingerprint);
    assert_eq!(mode(&dir.path().join("n.key")), 0o600);
    // The renewed pair loads and verifies.
    quicseal::Identity::from_pem_files(&crt, dir.path().join("n.key")).unwrap();
    assert_eq!(
        cert(&["verify", crt.to_str().unwrap(), "--ca", &format!("{d}/ca.crt"), "--name", "10.1.2.3"]).0.unwrap(),
        0
    );
}

/// Whether `r` failed with an error whose message satisfies `check`.
fn fails_with(r: &crate::Result<u8>, check: impl Fn(&str) -> bool) -> bool {
    matches!(r, Err(e) if check(&e.to_string()))
}
