//! `quicseal cert verify`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use quicseal::rustls::CertificateError;
use quicseal::{Error, TlsError, TrustStore};
use serde_json::json;
use x509_parser::prelude::*;

#[derive(Args, Debug)]
pub(super) struct VerifyArgs {
    /// The certificate (or chain, leaf first) to validate.
    cert: PathBuf,
    /// The CA certificate(s).
    #[arg(long, default_value = "certs/ca.crt")]
    ca: PathBuf,
    /// A CRL to check against (repeatable).
    #[arg(long)]
    crl: Vec<PathBuf>,
    /// Check as a node dialling NAME does (serverAuth; a DNS name or IP address must be a SAN,
    /// a SPIFFE ID spiffe://... the certificate's one URI SAN). Without it, check as a node
    /// accepting the certificate's owner does (clientAuth).
    #[arg(long)]
    name: Option<String>,
    /// JSON output: one object with the verdict, the exit code and the reason.
    #[arg(long)]
    json: bool,
}

pub(super) fn verify(a: VerifyArgs, out: &mut impl Write) -> crate::Result<u8> {
    // Bad input is exit 1, not a verdict: a file that is not a certificate, a name that is not
    // one.
    if let Some(name) = &a.name
        && let Err(e) = quicseal::PeerName::parse(name)
    {
        return Err(crate::CliError::Input(format!("--name: {}", input_reason(e))));
    }
    let chain = quicseal::load_certificates(&a.cert)?;
    for (i, der) in chain.iter().enumerate() {
        X509Certificate::from_der(der).map_err(|_| {
            crate::CliError::Input(format!(
                "{}: certificate {} of the file is not a valid X.509 certificate (malformed DER)",
                a.cert.display(),
                i + 1
            ))
        })?;
    }
    let mut trust = TrustStore::from_ca_file(&a.ca)?;
    for crl in &a.crl {
        trust.add_crl_file(crl)?;
    }
    let (code, verdict) = match trust.verify(&chain, a.name.as_deref()) {
        Ok(peer) => (0, format!("OK: {} ({})", a.cert.display(), peer.display_name())),
        Err(Error::Tls(tls @ TlsError::Local { .. })) => {
            use quicseal::rustls::Error as R;
            let TlsError::Local { error, .. } = &tls else { unreachable!("matched above") };
            let code = match error {
                R::InvalidCertificate(CertificateError::Expired | CertificateError::NotValidYet)
                | R::InvalidCertificate(CertificateError::ExpiredContext { .. })
                | R::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => 3,
                R::InvalidCertificate(CertificateError::Revoked) => 4,
                R::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                ) => 5,
                R::InvalidCertificate(CertificateError::Other(o)) if o.0.is::<quicseal::NotTheSvid>() => 5,
                _ => 2,
            };
            (code, format!("INVALID: {}: {}", a.cert.display(), tls.reason()))
        }
        Err(e) => return Err(e.into()),
    };
    if a.json {
        let v =
            json!({"file": a.cert.display().to_string(), "valid": code == 0, "exit_code": code, "verdict": verdict});
        writeln!(out, "{v}")?;
    } else {
        writeln!(out, "{verdict}")?;
    }
    Ok(code)
}

/// The reason in an input error, without the variant's prefix.
pub(crate) fn input_reason(e: Error) -> String {
    match e {
        Error::InvalidInput(why) => why,
        other => other.to_string(),
    }
}
