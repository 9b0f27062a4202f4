//! Reading certificates and CRLs for people: what `quicseal cert inspect` prints.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;
use x509_parser::prelude::*;

use super::hex;
use crate::error::{Error, Result};
use crate::identity::Fingerprint;

/// Certificates expiring sooner than this many days carry a warning.
pub const WARN_DAYS: i64 = 30;

/// One certificate or CRL described: fields in display order (JSON values).
pub type Report = Vec<(&'static str, serde_json::Value)>;

/// What a PEM file holds.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Inspection {
    /// One report per certificate or CRL, in file order.
    pub reports: Vec<Report>,
    /// Labels of PEM sections that are neither (keys...), skipped.
    pub skipped: Vec<String>,
}

/// Describes every certificate and CRL in PEM text: subject, SANs, issuer, serial, key
/// fingerprint (SPKI SHA-256), key type, extended key usages, validity with days left and a
/// warning under [`WARN_DAYS`] or when expired; for CRLs, issuer, number, update times and the
/// revoked serials. Input that is not PEM, a section that does not parse, or no certificate or
/// CRL at all is an error. Never panics.
pub fn inspect_pem(bytes: &[u8]) -> Result<Inspection> {
    let mut out = Inspection::default();
    for pem in Pem::iter_from_buffer(bytes) {
        let pem =
            pem.map_err(|e| Error::InvalidInput(format!("not PEM ({e}): give a PEM certificate, chain or CRL")))?;
        match pem.label.as_str() {
            "CERTIFICATE" => {
                let (_, cert) = X509Certificate::from_der(&pem.contents).map_err(|_| {
                    Error::InvalidInput(
                        "a CERTIFICATE section does not hold a valid X.509 certificate (malformed DER)".into(),
                    )
                })?;
                out.reports.push(describe_cert(&cert));
            }
            "X509 CRL" => {
                let (_, crl) = CertificateRevocationList::from_der(&pem.contents).map_err(|_| {
                    Error::InvalidInput("an X509 CRL section does not hold a valid CRL (malformed DER)".into())
                })?;
                out.reports.push(describe_crl(&crl));
            }
            other => out.skipped.push(other.to_owned()),
        }
    }
    if out.reports.is_empty() {
        return Err(Error::InvalidInput("no certificate or CRL in it: give a PEM certificate, chain or CRL".into()));
    }
    Ok(out)
}

fn time_str(t: ASN1Time) -> String {
    t.to_rfc2822().unwrap_or_else(|_| t.timestamp().to_string())
}

fn describe_cert(cert: &X509Certificate<'_>) -> Report {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let not_after = cert.validity().not_after.timestamp();
    let days_left = (not_after - now).div_euclid(86_400);
    let mut sans = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            sans.push(match name {
                GeneralName::DNSName(d) => format!("DNS:{d}"),
                GeneralName::URI(u) => format!("URI:{u}"),
                GeneralName::IPAddress(b) if b.len() == 4 => {
                    format!("IP:{}", IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default()))
                }
                GeneralName::IPAddress(b) if b.len() == 16 => {
                    format!("IP:{}", IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default()))
                }
                other => format!("{other:?}"),
            });
        }
    }
    let mut ekus = Vec::new();
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        if eku.value.server_auth {
            ekus.push("serverAuth");
        }
        if eku.value.client_auth {
            ekus.push("clientAuth");
        }
    }
    let alg = &cert.public_key().algorithm.algorithm;
    let key_type = if *alg == x509_parser::oid_registry::OID_SIG_ED25519 {
        "Ed25519".to_owned()
    } else if *alg == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = cert.public_key().algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == x509_parser::oid_registry::OID_EC_P256 => "ECDSA P-256".to_owned(),
            Some(c) => format!("ECDSA ({c})"),
            None => "ECDSA".to_owned(),
        }
    } else if *alg == x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION {
        "RSA".to_owned()
    } else {
        alg.to_id_string()
    };
    let warning = if days_left < 0 || not_after <= now {
        Some("EXPIRED".to_owned())
    } else if days_left < WARN_DAYS {
        Some(format!("expires in {days_left} days"))
    } else {
        None
    };
    let mut r: Report = vec![
        ("type", json!(if cert.is_ca() { "CA certificate" } else { "certificate" })),
        ("subject", json!(cert.subject().to_string())),
        ("sans", json!(sans)),
        ("issuer", json!(cert.issuer().to_string())),
        ("serial", json!(hex(cert.raw_serial()))),
        ("fingerprint", json!(Fingerprint::of_spki(cert.tbs_certificate.subject_pki.raw).to_string())),
        ("key_type", json!(key_type)),
        ("ekus", json!(ekus)),
        ("not_before", json!(time_str(cert.validity().not_before))),
        ("not_after", json!(time_str(cert.validity().not_after))),
        ("days_left", json!(days_left)),
    ];
    if let Some(w) = warning {
        r.push(("warning", json!(w)));
    }
    r
}

fn describe_crl(crl: &CertificateRevocationList<'_>) -> Report {
    let revoked: Vec<String> = crl.iter_revoked_certificates().map(|r| hex(r.raw_serial())).collect();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let mut r: Report = vec![
        ("type", json!("CRL")),
        ("issuer", json!(crl.issuer().to_string())),
        ("crl_number", json!(crl.crl_number().map(|n| n.to_string()))),
        ("this_update", json!(time_str(crl.last_update()))),
        ("next_update", json!(crl.next_update().map(time_str))),
        ("revoked", json!(revoked)),
    ];
    if let Some(next) = crl.next_update() {
        r.push(("days_left", json!((next.timestamp() - now).div_euclid(86_400))));
        if next.timestamp() <= now {
            r.push(("warning", json!("EXPIRED: nodes refuse every certificate of this CA until a new CRL")));
        }
    }
    r
}
