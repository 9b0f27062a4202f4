//! Who we are ([`Identity`]), whom we trust ([`TrustStore`]) and who the peer is ([`PeerIdentity`]).

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{PemObject, SectionKind};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::error::{Error, LoadError, LoadProblem, Result};

/// SHA-256 of a certificate's DER `SubjectPublicKeyInfo`: a stable name for a key.
///
/// Displays and parses as 64 lowercase hex digits (colons are accepted when parsing, as
/// `openssl` prints them).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER `SubjectPublicKeyInfo`.
    pub fn of_spki(spki_der: &[u8]) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, spki_der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }

    /// The fingerprint of the public key in a DER certificate.
    pub fn of_certificate(cert_der: &[u8]) -> Result<Fingerprint> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|e| Error::InvalidInput(format!("not a certificate: {e}")))?;
        Ok(Fingerprint::of_spki(cert.tbs_certificate.subject_pki.raw))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let hex: String = s.chars().filter(|c| *c != ':').collect();
        let bad = || Error::InvalidInput(format!("not a SHA-256 fingerprint (64 hex digits): {s:?}"));
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

/// SHA-256 over the issuer, subject and subject alternative names of `cert`, each length-prefixed.
fn names_digest(cert: &x509_parser::certificate::X509Certificate<'_>) -> Fingerprint {
    let san = cert
        .extensions()
        .iter()
        .find(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME)
        .map_or(&[][..], |e| e.value);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [cert.issuer().as_raw(), cert.subject().as_raw(), san] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Fingerprint(out)
}

/// The authenticated identity of a peer, read from its verified certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerIdentity {
    /// DNS name SANs.
    pub dns_names: Vec<String>,
    /// IP address SANs.
    pub ip_addresses: Vec<IpAddr>,
    /// URI SANs, such as `spiffe://example.org/node/a`.
    pub uris: Vec<String>,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
    /// SHA-256 of the certificate's public key.
    pub fingerprint: Fingerprint,
    /// Who the certificate names, whatever its key: SHA-256 over its issuer, its subject and its
    /// subject alternative names. A certificate renewed by the same CA for the same names (with
    /// a new key) keeps it, so sessions resume by it (and retired epochs are remembered by it):
    /// routine renewal does not end sessions.
    pub names_digest: Fingerprint,
    /// End of the certificate's validity.
    pub not_after: SystemTime,
}

impl PeerIdentity {
    /// Reads the identity from a DER end-entity certificate (already verified by TLS).
    pub fn from_certificate(cert_der: &[u8]) -> Result<PeerIdentity> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|e| Error::InvalidInput(format!("not a certificate: {e}")))?;
        let mut id = PeerIdentity {
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            uris: Vec::new(),
            common_name: cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned),
            fingerprint: Fingerprint::of_spki(cert.tbs_certificate.subject_pki.raw),
            names_digest: names_digest(&cert),
            not_after: {
                let t = cert.validity().not_after.timestamp();
                if t >= 0 {
                    UNIX_EPOCH + Duration::from_secs(t as u64)
                } else {
                    UNIX_EPOCH - Duration::from_secs(t.unsigned_abs())
                }
            },
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            use x509_parser::extensions::GeneralName;
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => id.dns_names.push((*d).to_owned()),
                    GeneralName::URI(u) => id.uris.push((*u).to_owned()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => id.ip_addresses.push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())),
                        16 => id.ip_addresses.push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Ok(id)
    }

    /// The first `spiffe://` URI SAN, if any.
    pub fn spiffe_id(&self) -> Option<&str> {
        self.uris.iter().map(String::as_str).find(|u| u.starts_with("spiffe://"))
    }

    /// The trust domain of the SPIFFE ID (`example.org` in `spiffe://example.org/node/a`).
    pub fn spiffe_trust_domain(&self) -> Option<&str> {
        crate::peer_name::trust_domain_of(self.spiffe_id()?)
    }

    /// Whether `name` is one of the DNS names, IP addresses or URIs (exact match), or the CN.
    pub fn has_name(&self, name: &str) -> bool {
        self.dns_names.iter().any(|d| d.eq_ignore_ascii_case(name))
            || self.uris.iter().any(|u| u == name)
            || name.parse::<IpAddr>().is_ok_and(|ip| self.ip_addresses.contains(&ip))
            || self.common_name.as_deref() == Some(name)
    }

    /// A short human-readable name: the SPIFFE ID, else the first DNS name, else the CN, else
    /// the fingerprint.
    pub fn display_name(&self) -> String {
        self.spiffe_id()
            .map(str::to_owned)
            .or_else(|| self.dns_names.first().cloned())
            .or_else(|| self.ip_addresses.first().map(|ip| ip.to_string()))
            .or_else(|| self.common_name.clone())
            .unwrap_or_else(|| self.fingerprint.to_string())
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (key {:.16}…)", self.display_name(), self.fingerprint.to_string())
    }
}

/// This node's certificate chain and private key.
#[derive(Clone)]
pub struct Identity {
    pub(crate) key: Arc<CertifiedKey>,
    fingerprint: Fingerprint,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads a certificate chain (leaf first) and its private key from PEM files.
    ///
    /// Keys may be PKCS#8 (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`) or PKCS#1
    /// (`RSA PRIVATE KEY`), as openssl, step and cfssl write them. Errors name the file.
    pub fn from_pem_files(cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Identity> {
        let (cert, key) = (cert.as_ref(), key.as_ref());
        let cert_pem = read(cert)?;
        // The key's bytes are wiped when dropped.
        let key_pem = zeroize::Zeroizing::new(read(key)?);
        Self::build(&cert_pem, Some(cert), &key_pem, Some(key))
    }

    /// Like [`Identity::from_pem_files`], from PEM text in memory.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Identity> {
        Self::build(cert_pem, None, key_pem, None)
    }

    fn build(cert_pem: &[u8], cert_path: Option<&Path>, key_pem: &[u8], key_path: Option<&Path>) -> Result<Identity> {
        let chain: Vec<CertificateDer<'static>> =
            sections(cert_pem, cert_path, "CERTIFICATE", |k| matches!(k, SectionKind::Certificate))?
                .into_iter()
                .map(|(_, der)| CertificateDer::from(der))
                .collect();
        let (kind, der) = sections(key_pem, key_path, "PRIVATE KEY", |k| {
            matches!(k, SectionKind::PrivateKey | SectionKind::EcPrivateKey | SectionKind::RsaPrivateKey)
        })?
        .into_iter()
        .next()
        .expect("sections() returns at least one");
        let key_der = match kind {
            SectionKind::PrivateKey => PrivateKeyDer::Pkcs8(der.into()),
            SectionKind::EcPrivateKey => PrivateKeyDer::Sec1(der.into()),
            _ => PrivateKeyDer::Pkcs1(der.into()),
        };
        Self::from_parts(chain, cert_path, key_der, key_path)
    }

    /// A certificate chain (DER, leaf first) and its private key (DER: PKCS#8, SEC1 or
    /// PKCS#1), as a SPIFFE Workload API or another API hands them over rather than files.
    /// The key's bytes are wiped once loaded.
    pub fn from_der(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Identity> {
        if chain.is_empty() {
            return Err(Error::InvalidInput("an identity needs a certificate: the chain is empty".into()));
        }
        Self::from_parts(chain, None, key, None)
    }

    fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        cert_path: Option<&Path>,
        mut key_der: PrivateKeyDer<'static>,
        key_path: Option<&Path>,
    ) -> Result<Identity> {
        let fingerprint = Fingerprint::of_certificate(&chain[0])
            .map_err(|_| load_err(cert_path, invalid("the first certificate does not parse")))?;
        let provider = provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key_der.clone_key())
            .map_err(|e| load_err(key_path, LoadProblem::Invalid(format!("unsupported or malformed key: {e}"))));
        // Our copy of the key is wiped; the signing key keeps its own (ring's, not ours to wipe).
        zeroize::Zeroize::zeroize(&mut key_der);
        let signing_key = signing_key?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(load_err(key_path.or(cert_path), LoadProblem::KeyMismatch).into());
            }
            Err(e) => return Err(load_err(cert_path, LoadProblem::Invalid(e.to_string())).into()),
        }
        Ok(Identity { key: Arc::new(certified), fingerprint })
    }

    /// The fingerprint of this identity's public key.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.key.cert
    }

    /// What this identity's own certificate says (names, key, expiry).
    pub fn certificate(&self) -> Result<PeerIdentity> {
        PeerIdentity::from_certificate(&self.key.cert[0])
    }
}

/// The CAs we accept peers from, optional CRLs, and an optional deny-list of keys.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    pub(crate) cas: Vec<CertificateDer<'static>>,
    /// SPIFFE trust bundles: per trust domain, the only CAs that vouch for its SPIFFE IDs.
    pub(crate) bundles: std::collections::BTreeMap<String, Vec<CertificateDer<'static>>>,
    pub(crate) crls: Vec<Crl>,
    pub(crate) denied: HashSet<Fingerprint>,
    /// Accept peer certificates without an extended key usage extension.
    pub(crate) eku_optional: bool,
}

/// A CRL as loaded, with what decides which CRL of an issuer is in force.
#[derive(Debug, Clone)]
pub(crate) struct Crl {
    pub(crate) der: CertificateRevocationListDer<'static>,
    /// The file it came from, to name in errors.
    pub(crate) source: Option<PathBuf>,
    /// The issuer's distinguished name, DER.
    pub(crate) issuer: Vec<u8>,
    /// The CRL Number (RFC 5280 section 5.2.3), big-endian without leading zeros.
    pub(crate) number: Vec<u8>,
    /// thisUpdate, seconds since the Unix epoch.
    pub(crate) this_update: i64,
}

impl Crl {
    /// Orders CRLs of one issuer: a higher CRL Number is newer, then a later thisUpdate.
    fn newness(&self) -> (usize, &[u8], i64) {
        (self.number.len(), &self.number, self.this_update)
    }

    fn describe(&self) -> String {
        match &self.source {
            Some(p) => format!("the CRL in {}", p.display()),
            None => "a CRL".into(),
        }
    }
}

impl TrustStore {
    /// An empty store (no CA: no peer is trusted until one is added).
    pub fn new() -> TrustStore {
        TrustStore::default()
    }

    /// Loads every CA certificate from a PEM file.
    pub fn from_ca_file(path: impl AsRef<Path>) -> Result<TrustStore> {
        let mut t = TrustStore::new();
        t.add_ca_file(path)?;
        Ok(t)
    }

    /// Adds every CA certificate from a PEM file.
    pub fn add_ca_file(&mut self, path: impl AsRef<Path>) -> Result<&mut Self> {
        let path = path.as_ref();
        self.add_cas(&read(path)?, Some(path))
    }

    /// Adds every CA certificate in PEM text.
    pub fn add_ca_pem(&mut self, pem: &[u8]) -> Result<&mut Self> {
        self.add_cas(pem, None)
    }

    /// Adds the trust bundle of SPIFFE trust domain `trust_domain` (such as `example.org`) from
    /// a PEM file of CA certificates (SPIFFE federation). A peer certificate whose SPIFFE ID is
    /// in a trust domain with a bundle must chain to that bundle, and to nothing else: the CAs
    /// added with [`TrustStore::add_ca_file`] and the other domains' bundles do not vouch for
    /// it. Certificates of trust domains without a bundle, and certificates without a SPIFFE
    /// ID, chain to those CAs as before. A certificate with SPIFFE IDs in two trust domains is
    /// refused. Loading a domain's bundle again adds to it.
    pub fn add_bundle_file(&mut self, trust_domain: &str, path: impl AsRef<Path>) -> Result<&mut Self> {
        let path = path.as_ref();
        self.add_bundle(trust_domain, &read(path)?, Some(path))
    }

    /// [`TrustStore::add_bundle_file`] from PEM text.
    pub fn add_bundle_pem(&mut self, trust_domain: &str, pem: &[u8]) -> Result<&mut Self> {
        self.add_bundle(trust_domain, pem, None)
    }

    /// [`TrustStore::add_bundle_file`] from DER certificates (as a SPIFFE Workload API hands
    /// bundles over).
    pub fn add_bundle_der(
        &mut self,
        trust_domain: &str,
        cas: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<&mut Self> {
        check_trust_domain(trust_domain)?;
        let cas = cas.into_iter().map(|der| ca_certificate(der.to_vec(), None)).collect::<Result<Vec<_>>>()?;
        self.bundles.entry(trust_domain.to_owned()).or_default().extend(cas);
        Ok(self)
    }

    fn add_bundle(&mut self, trust_domain: &str, pem: &[u8], path: Option<&Path>) -> Result<&mut Self> {
        check_trust_domain(trust_domain)?;
        let cas = ca_certificates(pem, path)?;
        self.bundles.entry(trust_domain.to_owned()).or_default().extend(cas);
        Ok(self)
    }

    /// The trust domains that have a bundle.
    pub fn bundle_domains(&self) -> Vec<&str> {
        self.bundles.keys().map(String::as_str).collect()
    }

    /// Every CA of the store: the CAs and every bundle's.
    fn all_cas(&self) -> impl Iterator<Item = &CertificateDer<'static>> {
        self.cas.iter().chain(self.bundles.values().flatten())
    }

    fn add_cas(&mut self, pem: &[u8], path: Option<&Path>) -> Result<&mut Self> {
        let cas = ca_certificates(pem, path)?;
        self.cas.extend(cas);
        Ok(self)
    }
}

/// Refuses a name that is not a SPIFFE trust domain.
fn check_trust_domain(trust_domain: &str) -> Result<()> {
    let id = crate::peer_name::SpiffeId::parse(&format!("spiffe://{trust_domain}"))?;
    if id.trust_domain() != trust_domain {
        return Err(Error::InvalidInput(format!("not a SPIFFE trust domain: {trust_domain:?}")));
    }
    Ok(())
}

/// The CA certificates of a PEM text; a certificate that is not a CA is an error.
fn ca_certificates(pem: &[u8], path: Option<&Path>) -> Result<Vec<CertificateDer<'static>>> {
    sections(pem, path, "CERTIFICATE", |k| matches!(k, SectionKind::Certificate))?
        .into_iter()
        .map(|(_, der)| ca_certificate(der, path))
        .collect()
}

/// A trust anchor: a certificate that parses and is a CA.
fn ca_certificate(der: Vec<u8>, path: Option<&Path>) -> Result<CertificateDer<'static>> {
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| load_err(path, LoadProblem::Invalid(format!("certificate does not parse: {e}"))))?;
    // A trust anchor must be a CA certificate: trusting a node's own certificate as a root
    // would let it vouch for nothing yet silently accept only itself.
    if !cert.is_ca() {
        return Err(load_err(
            path,
            LoadProblem::Invalid(format!(
                "{} is not a CA certificate (basicConstraints CA:TRUE missing): a trust store takes CA certificates \
                 only",
                cert.subject()
            )),
        )
        .into());
    }
    Ok(CertificateDer::from(der))
}

impl TrustStore {
    /// Adds every CRL from a PEM file (`X509 CRL` sections).
    pub fn add_crl_file(&mut self, path: impl AsRef<Path>) -> Result<&mut Self> {
        let path = path.as_ref();
        self.add_crls(&read(path)?, Some(path))
    }

    /// Adds every CRL in PEM text.
    pub fn add_crl_pem(&mut self, pem: &[u8]) -> Result<&mut Self> {
        self.add_crls(pem, None)
    }

    fn add_crls(&mut self, pem: &[u8], path: Option<&Path>) -> Result<&mut Self> {
        for (_, der) in sections(pem, path, "X509 CRL", |k| matches!(k, SectionKind::Crl))? {
            let crl = parse_crl(der, path)?;
            self.crls.push(crl);
        }
        Ok(self)
    }

    /// Of each issuer's CRLs, the newest (highest CRL Number, then latest thisUpdate), which
    /// supersedes the older ones whatever order they were loaded in.
    fn newest_crls(&self) -> std::collections::HashMap<&[u8], &Crl> {
        let mut newest: std::collections::HashMap<&[u8], &Crl> = std::collections::HashMap::new();
        for crl in &self.crls {
            let slot = newest.entry(&crl.issuer).or_insert(crl);
            if crl.newness() > slot.newness() {
                *slot = crl;
            }
        }
        newest
    }

    /// The CRLs in force ([`TrustStore::newest_crls`]). Every CRL loaded must be signed by a CA
    /// of this store, or the store is unusable (a CRL from an unknown CA would otherwise be
    /// ignored and silently leave its revocations unenforced).
    pub(crate) fn crls_in_force(&self) -> Result<Vec<CertificateRevocationListDer<'static>>> {
        for crl in &self.crls {
            self.check_crl_signature(crl)?;
        }
        Ok(self.newest_crls().into_values().map(|c| c.der.clone()).collect())
    }

    /// Refuses to replace `current` by this store if that would roll revocation back: for a CA
    /// this store still trusts, the CRL in force must not be older (a lower CRL Number) than
    /// the one `current` has, nor missing.
    pub(crate) fn check_no_revocation_rollback(&self, current: &TrustStore) -> Result<()> {
        let new = self.newest_crls();
        for (issuer, in_force) in current.newest_crls() {
            if !self.has_ca_named(issuer) {
                continue;
            }
            let older = match new.get(issuer) {
                None => "missing",
                Some(crl) if (crl.number.len(), &crl.number) < (in_force.number.len(), &in_force.number) => "older",
                Some(_) => continue,
            };
            let number: String = in_force.number.iter().map(|b| format!("{b:02x}")).collect();
            return Err(Error::Config(format!(
                "refusing to roll back revocation: the new trust store's CRL for a trusted CA is {older} (the one \
                 in force has CRL Number {number}); load the newest CRL"
            )));
        }
        Ok(())
    }

    /// Whether the store has a CA whose subject is `issuer` (DER).
    fn has_ca_named(&self, issuer: &[u8]) -> bool {
        self.all_cas()
            .any(|ca| x509_parser::parse_x509_certificate(ca).is_ok_and(|(_, c)| c.subject().as_raw() == issuer))
    }

    fn check_crl_signature(&self, crl: &Crl) -> Result<()> {
        use x509_parser::prelude::FromDer;
        let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(&crl.der)
            .map_err(|e| load_err(crl.source.as_deref(), LoadProblem::Invalid(format!("CRL does not parse: {e}"))))?;
        let signed = self.all_cas().any(|ca| {
            x509_parser::parse_x509_certificate(ca).is_ok_and(|(_, ca)| {
                ca.subject().as_raw() == crl.issuer && parsed.verify_signature(ca.public_key()).is_ok()
            })
        });
        if signed {
            return Ok(());
        }
        Err(load_err(
            crl.source.as_deref(),
            LoadProblem::Invalid(format!(
                "{} (issuer {}) is not signed by any CA of the trust store: add its CA, or remove the CRL",
                crl.describe(),
                parsed.issuer()
            )),
        )
        .into())
    }

    /// Refuses any peer whose public key has this fingerprint, whatever its certificate says.
    pub fn deny(&mut self, fingerprint: Fingerprint) -> &mut Self {
        self.denied.insert(fingerprint);
        self
    }

    /// Accepts peer certificates that carry no extended key usage extension at all (by default
    /// they are refused: a node certificate must say it may accept, `serverAuth`, or dial,
    /// `clientAuth`). Only for a PKI that omits EKU everywhere; with it, any certificate of a
    /// trusted CA passes in both roles. A certificate that has the extension must still name the
    /// right usage.
    pub fn dangerous_allow_missing_eku(&mut self, allow: bool) -> &mut Self {
        self.eku_optional = allow;
        self
    }

    /// Number of CA certificates.
    pub fn ca_count(&self) -> usize {
        self.cas.len()
    }

    /// The fingerprints on the deny-list.
    pub fn denied_keys(&self) -> Vec<Fingerprint> {
        self.denied.iter().copied().collect()
    }

    /// The CA certificates added with [`TrustStore::add_ca_file`] and its siblings (the trust
    /// bundles' are in [`TrustStore::bundle`]).
    pub fn cas(&self) -> &[CertificateDer<'static>] {
        &self.cas
    }

    /// The CA certificates of trust domain `trust_domain`'s bundle, if it has one.
    pub fn bundle(&self, trust_domain: &str) -> Option<&[CertificateDer<'static>]> {
        self.bundles.get(trust_domain).map(Vec::as_slice)
    }
}

/// The rustls crypto provider quicseal uses everywhere (ring), made once.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

/// Reads every certificate of a PEM file (a certificate or a chain), leaf first.
pub fn load_certificates(path: impl AsRef<Path>) -> Result<Vec<CertificateDer<'static>>> {
    let path = path.as_ref();
    let pem = read(path)?;
    Ok(sections(&pem, Some(path), "CERTIFICATE", |k| matches!(k, SectionKind::Certificate))?
        .into_iter()
        .map(|(_, der)| CertificateDer::from(der))
        .collect())
}

/// Parses a CRL and reads what decides which CRL of an issuer is in force. The TLS library
/// (webpki) refuses CRLs without a CRL Number, so one without is a load error here, naming the
/// file, rather than a failure later that names nothing.
fn parse_crl(der: Vec<u8>, path: Option<&Path>) -> Result<Crl> {
    use x509_parser::prelude::FromDer;
    let invalid = |why: String| -> Error { load_err(path, LoadProblem::Invalid(why)).into() };
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
        .map_err(|e| invalid(format!("CRL does not parse: {e}")))?;
    let number = crl.crl_number().ok_or_else(|| {
        invalid(
            "CRL has no CRL Number extension (RFC 5280 section 5.2.3), which is required: with `openssl ca \
             -gencrl`, set crlnumber in the configuration and pass -crlexts or crl_extensions"
                .into(),
        )
    })?;
    let issuer = crl.issuer().as_raw().to_vec();
    let this_update = crl.last_update().timestamp();
    Ok(Crl {
        number: number.to_bytes_be(),
        issuer,
        this_update,
        source: path.map(PathBuf::from),
        der: CertificateRevocationListDer::from(der),
    })
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| load_err(Some(path), LoadProblem::Unreadable(e.to_string())).into())
}

fn invalid(s: &str) -> LoadProblem {
    LoadProblem::Invalid(s.to_owned())
}

fn load_err(path: Option<&Path>, problem: LoadProblem) -> LoadError {
    LoadError { path: path.map(PathBuf::from), problem }
}

/// The PEM sections of `pem` whose kind passes `want`; an error naming the file when there are
/// none (distinguishing "not PEM at all" from "PEM of another type").
fn sections(
    pem: &[u8],
    path: Option<&Path>,
    expected: &'static str,
    want: impl Fn(SectionKind) -> bool,
) -> Result<Vec<(SectionKind, Vec<u8>)>> {
    let mut found = Vec::new();
    let mut kept = Vec::new();
    for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem) {
        let (kind, der) = item.map_err(|e| load_err(path, LoadProblem::NotPem(e.to_string())))?;
        if want(kind) {
            kept.push((kind, der));
        } else {
            found.push(section_name(kind).to_owned());
        }
    }
    if kept.is_empty() {
        let problem = if found.is_empty() {
            LoadProblem::NotPem("no PEM section found".into())
        } else {
            LoadProblem::WrongPemType { expected, found }
        };
        return Err(load_err(path, problem).into());
    }
    Ok(kept)
}

fn section_name(kind: SectionKind) -> &'static str {
    match kind {
        SectionKind::Certificate => "CERTIFICATE",
        SectionKind::PublicKey => "PUBLIC KEY",
        SectionKind::RsaPrivateKey => "RSA PRIVATE KEY",
        SectionKind::PrivateKey => "PRIVATE KEY",
        SectionKind::EcPrivateKey => "EC PRIVATE KEY",
        SectionKind::Crl => "X509 CRL",
        SectionKind::Csr => "CERTIFICATE REQUEST",
        SectionKind::EchConfigList => "ECHCONFIG",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_round_trips_and_accepts_colons() {
        let fp = Fingerprint([0xab; 32]);
        assert_eq!(fp.to_string().parse::<Fingerprint>().unwrap(), fp);
        let colons = fp.0.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), fp);
        assert!("abc".parse::<Fingerprint>().is_err());
        assert!("é".repeat(32).parse::<Fingerprint>().is_err());
    }

    #[test]
    fn spiffe_trust_domain() {
        let mut id = PeerIdentity {
            dns_names: vec![],
            ip_addresses: vec![],
            uris: vec!["https://x".into(), "spiffe://example.org/node/a".into()],
            common_name: None,
            fingerprint: Fingerprint([0; 32]),
            names_digest: Fingerprint([0; 32]),
            not_after: UNIX_EPOCH,
        };
        assert_eq!(id.spiffe_trust_domain(), Some("example.org"));
        id.uris = vec!["spiffe://bare".into()];
        assert_eq!(id.spiffe_trust_domain(), Some("bare"));
    }
}
