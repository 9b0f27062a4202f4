//! Certificate authority, node certificates and revocation lists, made with rcgen.
//!
//! The demo, the tests and the `quicseal` CLI all create their PKI through this module, so
//! what we test is what operators get. Defaults follow step, cfssl and SPIRE: ECDSA P-256
//! keys, PKCS#8 PEM, random 128-bit serial numbers, CA path length 0 (a quicseal CA signs node
//! certificates only), node certificates valid for both `clientAuth` and `serverAuth` (a node
//! both dials and accepts).

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType,
    SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::error::{Error, Result};

mod ca_dir;
mod inspect;
pub use ca_dir::{CaDir, Revocation, hex, refuse_existing, unhex, write_atomic};
pub use inspect::{Inspection, Report, WARN_DAYS, inspect_pem};
pub use rcgen::RevocationReason;

/// The key algorithm of a generated key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256 (the default, as in step, cfssl and SPIRE).
    #[default]
    EcdsaP256,
    /// Ed25519.
    Ed25519,
}

impl KeyType {
    fn generate(self) -> Result<KeyPair> {
        let alg = match self {
            KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::Ed25519 => &rcgen::PKCS_ED25519,
        };
        KeyPair::generate_for(alg).map_err(pki_err)
    }
}

/// Which extended key usages a node certificate carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Usage {
    /// `clientAuth` and `serverAuth`: the node can dial and accept (the default).
    #[default]
    ClientAndServer,
    /// `clientAuth` only: the node can dial but nobody will accept it as a listener.
    ClientOnly,
    /// `serverAuth` only: the node can accept but cannot dial.
    ServerOnly,
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    /// The certificate chain, leaf first, then the issuing CA (PEM).
    pub chain_pem: String,
    /// The leaf certificate alone (DER).
    pub cert_der: CertificateDer<'static>,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The certificate's serial number (big-endian, positive).
    pub serial: Vec<u8>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("serial", &self.serial).finish_non_exhaustive()
    }
}

/// What a node certificate says. Build with [`NodeCert::new`] and the setters.
#[derive(Debug, Clone)]
pub struct NodeCert {
    common_name: String,
    dns: Vec<String>,
    ips: Vec<IpAddr>,
    uris: Vec<String>,
    usage: Usage,
    key_type: KeyType,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl NodeCert {
    /// A certificate with subject CN `common_name`, no SANs yet, valid from one minute ago
    /// (clock skew) for 90 days.
    pub fn new(common_name: impl Into<String>) -> Self {
        let now = SystemTime::now();
        NodeCert {
            common_name: common_name.into(),
            dns: Vec::new(),
            ips: Vec::new(),
            uris: Vec::new(),
            usage: Usage::default(),
            key_type: KeyType::default(),
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(90 * 24 * 3600),
        }
    }
    /// Adds a DNS name SAN.
    pub fn dns(mut self, name: impl Into<String>) -> Self {
        self.dns.push(name.into());
        self
    }
    /// Adds an IP address SAN.
    pub fn ip(mut self, ip: IpAddr) -> Self {
        self.ips.push(ip);
        self
    }
    /// Adds a URI SAN, such as `spiffe://example.org/node/a`.
    pub fn uri(mut self, uri: impl Into<String>) -> Self {
        self.uris.push(uri.into());
        self
    }
    /// Sets the extended key usages.
    pub fn usage(mut self, usage: Usage) -> Self {
        self.usage = usage;
        self
    }
    /// Sets the key algorithm.
    pub fn key_type(mut self, key_type: KeyType) -> Self {
        self.key_type = key_type;
        self
    }
    /// Sets the validity period.
    pub fn validity(mut self, not_before: SystemTime, not_after: SystemTime) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }

    /// What an existing certificate says (common name, SANs, key usages, key type), with a new
    /// validity of `validity` from one minute ago: the starting point to renew it.
    pub fn from_certificate(cert_der: &[u8], validity: Duration) -> Result<NodeCert> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|e| Error::InvalidInput(format!("not a certificate: {e}")))?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| Error::InvalidInput("the certificate has no common name".into()))?;
        let now = SystemTime::now();
        let mut node = NodeCert::new(common_name).validity(now - Duration::from_secs(60), now + validity);
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            use x509_parser::extensions::GeneralName;
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => node = node.dns(*d),
                    GeneralName::URI(u) => node = node.uri(*u),
                    GeneralName::IPAddress(b) if b.len() == 4 => {
                        node = node.ip(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default()))
                    }
                    GeneralName::IPAddress(b) if b.len() == 16 => {
                        node = node.ip(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default()))
                    }
                    _ => {}
                }
            }
        }
        if let Ok(Some(eku)) = cert.extended_key_usage() {
            node.usage = match (eku.value.client_auth, eku.value.server_auth) {
                (true, false) => Usage::ClientOnly,
                (false, true) => Usage::ServerOnly,
                _ => Usage::ClientAndServer,
            };
        }
        node.key_type = if cert.public_key().algorithm.algorithm == x509_parser::oid_registry::OID_SIG_ED25519 {
            KeyType::Ed25519
        } else {
            KeyType::EcdsaP256
        };
        Ok(node)
    }

    fn params(&self) -> Result<CertificateParams> {
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(&self.common_name);
        p.not_before = OffsetDateTime::from(self.not_before);
        p.not_after = OffsetDateTime::from(self.not_after);
        p.serial_number = Some(random_serial()?);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = match self.usage {
            Usage::ClientAndServer => {
                vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
            }
            Usage::ClientOnly => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::ServerOnly => vec![ExtendedKeyUsagePurpose::ServerAuth],
        };
        p.use_authority_key_identifier_extension = true;
        for d in &self.dns {
            if !is_dns_name(d) {
                return Err(Error::InvalidInput(format!("not a DNS name: {d:?}")));
            }
            let name = d.clone().try_into().map_err(|_| Error::InvalidInput(format!("not a DNS name: {d:?}")))?;
            p.subject_alt_names.push(SanType::DnsName(name));
        }
        for ip in &self.ips {
            p.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        for u in &self.uris {
            if !is_uri(u) {
                return Err(Error::InvalidInput(format!("not a URI: {u:?}")));
            }
            let uri = u.clone().try_into().map_err(|_| Error::InvalidInput(format!("not a URI: {u:?}")))?;
            p.subject_alt_names.push(SanType::URI(uri));
        }
        Ok(p)
    }

    /// Issues a self-signed leaf certificate (not a CA): useful to test that such a
    /// certificate is refused.
    pub fn self_signed(&self) -> Result<Issued> {
        let key = self.key_type.generate()?;
        let params = self.params()?;
        let serial = params.serial_number.as_ref().map(|s| s.to_bytes()).unwrap_or_default();
        let cert = params.self_signed(&key).map_err(pki_err)?;
        Ok(Issued { chain_pem: cert.pem(), cert_der: cert.der().clone(), key_pem: key.serialize_pem(), serial })
    }
}

/// A certificate being revoked in a CRL.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// Serial number of the revoked certificate (big-endian).
    pub serial: Vec<u8>,
    /// When the CA revoked it.
    pub revoked_at: SystemTime,
    /// Why, if said.
    pub reason: Option<RevocationReason>,
}

/// A certificate authority: a self-signed CA certificate and its key.
pub struct Ca {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a CA named `name`, valid from one minute ago for `validity`.
    pub fn new(name: &str, key_type: KeyType, validity: Duration) -> Result<Ca> {
        let key = key_type.generate()?;
        let now = SystemTime::now();
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(name);
        p.not_before = OffsetDateTime::from(now - Duration::from_secs(60));
        p.not_after = OffsetDateTime::from(now + validity);
        p.serial_number = Some(random_serial()?);
        // Path length 0: a quicseal CA signs node certificates, never other CAs.
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = p.self_signed(&key).map_err(pki_err)?;
        let key_pem = key.serialize_pem();
        Ok(Ca { cert_der: cert.der().clone(), cert_pem: cert.pem(), key_pem, issuer: Issuer::new(p, key) })
    }

    /// Loads a CA from its PEM certificate and PEM private key; refuses a key that does not
    /// belong to the certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca> {
        let key = KeyPair::from_pem(key_pem).map_err(pki_err)?;
        let cert_der: CertificateDer<'static> = {
            use rustls_pki_types::pem::PemObject;
            CertificateDer::from_pem_slice(cert_pem.as_bytes())
                .map_err(|e| Error::InvalidInput(format!("CA certificate: {e}")))?
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| Error::InvalidInput(format!("CA certificate: {e}")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(Error::InvalidInput("the CA key does not match the CA certificate".into()));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(pki_err)?;
        Ok(Ca { cert_der, cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned(), issuer })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }
    /// The CA private key, PKCS#8 PEM. Keep it offline.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a node certificate signed by this CA, with a new key. The returned chain is leaf
    /// then CA.
    pub fn issue(&self, node: &NodeCert) -> Result<Issued> {
        self.sign(node, &node.key_type.generate()?)
    }

    /// Issues a node certificate for an existing private key (PEM), for example to renew a
    /// certificate without changing its key. The returned `key_pem` is that key (as PKCS#8).
    pub fn issue_with_key(&self, node: &NodeCert, key_pem: &str) -> Result<Issued> {
        self.sign(node, &KeyPair::from_pem(key_pem).map_err(pki_err)?)
    }

    fn sign(&self, node: &NodeCert, key: &KeyPair) -> Result<Issued> {
        let params = node.params()?;
        let serial = params.serial_number.as_ref().map(|s| s.to_bytes()).unwrap_or_default();
        let cert = params.signed_by(key, &self.issuer).map_err(pki_err)?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            cert_der: cert.der().clone(),
            key_pem: key.serialize_pem(),
            serial,
        })
    }

    /// Whether `cert_der` names this CA as its issuer (issuer name equals our subject name).
    pub fn is_issuer_of(&self, cert_der: &[u8]) -> bool {
        let (Ok((_, ours)), Ok((_, theirs))) =
            (x509_parser::parse_x509_certificate(&self.cert_der), x509_parser::parse_x509_certificate(cert_der))
        else {
            return false;
        };
        ours.subject().as_raw() == theirs.issuer().as_raw()
    }

    /// Signs a CRL listing `revoked`, valid from `this_update` until `next_update`; returns PEM.
    pub fn crl(
        &self,
        revoked: &[Revoked],
        crl_number: u64,
        this_update: SystemTime,
        next_update: SystemTime,
    ) -> Result<String> {
        let params = CertificateRevocationListParams {
            this_update: OffsetDateTime::from(this_update),
            next_update: OffsetDateTime::from(next_update),
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&r.serial),
                    revocation_time: OffsetDateTime::from(r.revoked_at),
                    reason_code: r.reason,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).map_err(pki_err)?.pem().map_err(pki_err)
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// RFC 1123 host name syntax: dot-separated labels of 1 to 63 letters, digits, `-` or `_`
/// (not starting or ending with `-`), 253 bytes at most.
fn is_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// An absolute URI: an RFC 3986 scheme, a colon, then printable ASCII without spaces.
fn is_uri(uri: &str) -> bool {
    let Some((scheme, _)) = uri.split_once(':') else { return false };
    scheme.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        && uri.bytes().all(|b| b.is_ascii_graphic())
}

/// A random positive 128-bit serial number (RFC 5280 allows up to 20 octets).
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    SystemRandom::new().fill(&mut bytes).map_err(|_| Error::Internal("system RNG failed".into()))?;
    // Positive, and no leading zero octet, so the DER encoding is exactly these 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn pki_err(e: rcgen::Error) -> Error {
    Error::InvalidInput(format!("certificate generation: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_chain_is_leaf_then_ca_and_serial_is_positive() {
        let ca = Ca::new("test CA", KeyType::EcdsaP256, Duration::from_secs(3600)).unwrap();
        let node = ca.issue(&NodeCert::new("a").dns("a.example")).unwrap();
        assert_eq!(node.chain_pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(node.chain_pem.ends_with(ca.cert_pem()));
        assert_eq!(node.serial.len(), 16);
        assert!(node.serial[0] & 0x80 == 0 && node.serial[0] != 0);
        let (_, leaf) = x509_parser::parse_x509_certificate(&node.cert_der).unwrap();
        assert_eq!(leaf.raw_serial(), node.serial.as_slice());
    }

    #[test]
    fn ca_round_trips_through_pem_and_refuses_a_foreign_key() {
        let ca = Ca::new("test CA", KeyType::Ed25519, Duration::from_secs(3600)).unwrap();
        let again = Ca::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        again.issue(&NodeCert::new("b").dns("b.example")).unwrap();
        let other = Ca::new("other", KeyType::Ed25519, Duration::from_secs(3600)).unwrap();
        assert!(matches!(Ca::from_pem(ca.cert_pem(), other.key_pem()), Err(Error::InvalidInput(_))));
    }

    #[test]
    fn a_certificate_renews_with_its_names_and_optionally_its_key() {
        let ca = Ca::new("test CA", KeyType::EcdsaP256, Duration::from_secs(3600)).unwrap();
        let old = ca
            .issue(
                &NodeCert::new("n")
                    .dns("n.example")
                    .ip("10.0.0.1".parse().unwrap())
                    .uri("spiffe://t/n")
                    .usage(Usage::ServerOnly)
                    .key_type(KeyType::Ed25519),
            )
            .unwrap();
        let spec = NodeCert::from_certificate(&old.cert_der, Duration::from_secs(7200)).unwrap();
        assert_eq!(spec.common_name, "n");
        assert_eq!(spec.dns, ["n.example"]);
        assert_eq!(spec.ips, ["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(spec.uris, ["spiffe://t/n"]);
        assert_eq!((spec.usage, spec.key_type), (Usage::ServerOnly, KeyType::Ed25519));
        let same_key = ca.issue_with_key(&spec, &old.key_pem).unwrap();
        let new_key = ca.issue(&spec).unwrap();
        let spki = |der: &[u8]| x509_parser::parse_x509_certificate(der).unwrap().1.public_key().raw.to_vec();
        assert_eq!(spki(&same_key.cert_der), spki(&old.cert_der));
        assert_ne!(spki(&new_key.cert_der), spki(&old.cert_der));
        assert_ne!(same_key.serial, old.serial);
        assert!(ca.is_issuer_of(&same_key.cert_der));
        let other = Ca::new("other CA", KeyType::EcdsaP256, Duration::from_secs(3600)).unwrap();
        assert!(!other.is_issuer_of(&same_key.cert_der));
    }

    #[test]
    fn bad_san_is_a_config_error() {
        let ca = Ca::new("test CA", KeyType::EcdsaP256, Duration::from_secs(3600)).unwrap();
        for bad in
            [NodeCert::new("x").dns("bad name"), NodeCert::new("x").dns("a..b"), NodeCert::new("x").uri("no scheme")]
        {
            assert!(matches!(ca.issue(&bad), Err(Error::InvalidInput(_))), "{bad:?}");
        }
        ca.issue(&NodeCert::new("x").dns("a-b.example").uri("spiffe://example.org/x")).unwrap();
    }
}
