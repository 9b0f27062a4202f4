//! `quicseal cert renew`.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Args;
use quicseal::pki::{CaDir, NodeCert, hex, write_atomic};

use super::DAY;
use crate::args;

#[derive(Args, Debug)]
pub(super) struct RenewArgs {
    /// The certificate to renew; replaced in place.
    cert: PathBuf,
    /// Its key (default: the certificate's path with .key); replaced unless --reuse-key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Keep the current key.
    #[arg(long)]
    reuse_key: bool,
    /// Validity in days (1 to 36500, and not beyond the CA's own expiry).
    #[arg(long, default_value = "90", value_parser = args::days)]
    days: u32,
    /// Directory of the CA.
    #[arg(long, default_value = "certs")]
    ca_dir: PathBuf,
}

pub(super) fn renew(a: RenewArgs, out: &mut impl Write) -> crate::Result<u8> {
    let ca_dir = CaDir::open(&a.ca_dir)?;
    let ca = ca_dir.ca();
    let chain = quicseal::load_certificates(&a.cert)?;
    if !ca.is_issuer_of(&chain[0]) {
        return Err(crate::CliError::Input(format!(
            "{} was not issued by the CA in {}",
            a.cert.display(),
            a.ca_dir.display()
        )));
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| crate::CliError::Input(format!("{}: certificate does not parse: {e}", a.cert.display())))?;
    if parsed.is_ca() {
        // Renewing a CA as a node certificate would replace the CA's key with a node key and
        // write a node certificate over the CA's: every later issuance would be broken.
        return Err(crate::CliError::Input(format!(
            "{} is a CA certificate: `cert renew` renews node certificates. To rotate a CA, make a new one with \
             `cert init --out NEWDIR`, trust both CA certificates during an overlap, re-issue the nodes from the \
             new CA, then drop the old one",
            a.cert.display()
        )));
    }
    let key_path = a.key.clone().unwrap_or_else(|| a.cert.with_extension("key"));
    if key_path.is_dir() {
        return Err(crate::CliError::Input(format!(
            "--key {}: is a directory: give the key file (default: the certificate's path with .key)",
            key_path.display()
        )));
    }
    let not_after = ca_dir.leaf_not_after(a.days)?;
    let mut spec = NodeCert::from_certificate(&chain[0], DAY * a.days)?;
    spec = spec.validity(SystemTime::now() - Duration::from_secs(60), not_after);
    let issued = if a.reuse_key {
        let key = std::fs::read_to_string(&key_path)
            .map_err(|e| crate::CliError::Input(format!("{}: {e}", key_path.display())))?;
        // The key must be this certificate's own.
        let cert_pem = std::fs::read(&a.cert)?;
        quicseal::Identity::from_pem(&cert_pem, key.as_bytes()).map_err(|e| {
            crate::CliError::Input(format!("{} is not the key of {}: {e}", key_path.display(), a.cert.display()))
        })?;
        // A key revoked for compromise is never certified again, under this certificate or any
        // other that carried it.
        let fingerprint = quicseal::Fingerprint::of_spki(parsed.tbs_certificate.subject_pki.raw);
        if ca_dir.key_compromised(parsed.raw_serial(), fingerprint)? {
            return Err(crate::CliError::Input(format!(
                "the key of {} was revoked for key compromise: it must not be certified again; renew without \
                 --reuse-key",
                a.cert.display()
            )));
        }
        ca.issue_with_key(&spec, &key)?
    } else {
        ca.issue(&spec)?
    };
    let name = parsed.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or("-");
    ca_dir.record_issued(&issued.serial, name, not_after)?;
    if !a.reuse_key {
        write_atomic(&key_path, &issued.key_pem, 0o600, true)?;
    }
    write_atomic(&a.cert, &issued.chain_pem, 0o644, true)?;
    let what = if a.reuse_key { "same key" } else { "new key" };
    writeln!(out, "renewed {} (serial {}, {what}), valid {} days", a.cert.display(), hex(&issued.serial), a.days)?;
    Ok(0)
}
