//! `quicseal cert revoke`.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, ValueEnum};
use quicseal::pki::{CaDir, Revocation, RevocationReason, hex, unhex};
use x509_parser::prelude::*;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(super) enum ReasonArg {
    Unspecified,
    KeyCompromise,
    Superseded,
    CessationOfOperation,
    AffiliationChanged,
}

impl ReasonArg {
    fn rcgen(self) -> RevocationReason {
        use RevocationReason as R;
        match self {
            ReasonArg::Unspecified => R::Unspecified,
            ReasonArg::KeyCompromise => R::KeyCompromise,
            ReasonArg::Superseded => R::Superseded,
            ReasonArg::CessationOfOperation => R::CessationOfOperation,
            ReasonArg::AffiliationChanged => R::AffiliationChanged,
        }
    }
}

#[derive(Args, Debug)]
pub(super) struct RevokeArgs {
    /// The certificate to revoke (or give --serial).
    #[arg(required_unless_present = "serial", conflicts_with = "serial")]
    cert: Option<PathBuf>,
    /// The serial number to revoke, in hex; it must be one `cert issue` or `cert renew`
    /// recorded in the CA directory's `issued` list, unless --force.
    #[arg(long)]
    serial: Option<String>,
    /// Why.
    #[arg(long, value_enum, default_value = "unspecified")]
    reason: ReasonArg,
    /// Directory of the CA.
    #[arg(long, default_value = "certs")]
    ca_dir: PathBuf,
    /// Revoke a --serial this CA directory has no record of issuing.
    #[arg(long)]
    force: bool,
}

pub(super) fn revoke(a: RevokeArgs, out: &mut impl Write) -> crate::Result<u8> {
    let ca_dir = CaDir::open(&a.ca_dir)?;
    let (serial, key) = match (&a.cert, &a.serial) {
        (Some(path), _) => {
            let chain = quicseal::load_certificates(path)?;
            if !ca_dir.ca().is_issuer_of(&chain[0]) {
                return Err(crate::CliError::Input(format!(
                    "{} was not issued by the CA in {}",
                    path.display(),
                    a.ca_dir.display()
                )));
            }
            let (_, cert) = X509Certificate::from_der(&chain[0]).map_err(|e| crate::CliError::Input(e.to_string()))?;
            let key = quicseal::Fingerprint::of_spki(cert.tbs_certificate.subject_pki.raw);
            (cert.raw_serial().to_vec(), Some(key))
        }
        (None, Some(hex)) => {
            let serial =
                unhex(hex).ok_or_else(|| crate::CliError::Input(format!("not a hex serial number: {hex:?}")))?;
            if !a.force && !ca_dir.was_issued(&serial)? {
                return Err(crate::CliError::Input(format!(
                    "serial {hex} was never issued from {} (not in its `issued` list): check the serial \
                     (`cert inspect CERT` shows it), or add --force to revoke it anyway",
                    a.ca_dir.display()
                )));
            }
            (serial, None)
        }
        (None, None) => return Err(crate::CliError::Input("give a certificate or --serial".into())),
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let revocation =
        Revocation { serial: serial.clone(), at: UNIX_EPOCH + Duration::from_secs(now), reason: a.reason.rcgen(), key };
    if !ca_dir.revoke(revocation)? {
        writeln!(out, "serial {} was already revoked", hex(&serial))?;
        return Ok(0);
    }
    writeln!(out, "revoked serial {}; run `quicseal cert crl` to publish it", hex(&serial))?;
    Ok(0)
}
