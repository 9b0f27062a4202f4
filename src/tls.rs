//! rustls configurations for QUIC: mutual authentication, TLS 1.3 only, no 0-RTT, no
//! resumption, ALPN `quicseal/1`, ring as the crypto provider.
//!
//! We build the rustls configs ourselves because quinn's convenience constructors turn 0-RTT
//! on. Session resumption is off too: a resumed session would skip the certificate check, so
//! a certificate revoked since the first handshake could come back in.
//!
//! Each handshake in progress has its own verifier wrapper that records the typed rustls error
//! of a refused certificate, so the local error names the exact reason (quinn only keeps a
//! string). A configuration whose handshake has finished goes back to a small pool for the next
//! handshake (its verifier is never called again for the connection it served), so a node holds
//! about as many configurations as it has handshakes in progress, not one per connection.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, WebPkiServerVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};

use crate::error::{Error, Result};
use crate::identity::{Fingerprint, Identity, PeerIdentity, TrustStore};
use crate::peer_name::{PeerName, SpiffeId, trust_domain_of};

/// The ALPN protocol every quicseal connection negotiates.
pub const ALPN: &[u8] = b"quicseal/1";

pub(crate) use crate::identity::provider;

/// The reason a certificate was refused because its key is on the trust store's deny-list.
///
/// Appears as `rustls::Error::InvalidCertificate(CertificateError::Other(..))`; use
/// [`crate::TlsError`] and `downcast_ref::<DeniedKey>()` on the inner error to recognise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeniedKey(pub Fingerprint);

impl fmt::Display for DeniedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the certificate's key {} is on the deny-list", self.0)
    }
}

impl std::error::Error for DeniedKey {}

/// Why a certificate without an extended key usage extension was refused: both node
/// certificates must say what they are for (`serverAuth` to accept, `clientAuth` to dial), or
/// any certificate of the CA, whatever it was issued for, would pass. Look for it like
/// [`DeniedKey`]. A PKI that omits EKU can opt out with
/// [`TrustStore::dangerous_allow_missing_eku`](crate::TrustStore::dangerous_allow_missing_eku).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingExtendedKeyUsage {
    /// The usage the certificate needed: `"serverAuth"` or `"clientAuth"`.
    pub needed: &'static str,
}

impl fmt::Display for MissingExtendedKeyUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the certificate has no extended key usage extension ({} required)", self.needed)
    }
}

impl std::error::Error for MissingExtendedKeyUsage {}

/// What we check of a peer's end-entity certificate before webpki: the deny-list, and that an
/// extended key usage extension is present (webpki checks its purpose when it is, but accepts a
/// certificate without one).
#[derive(Debug, Default)]
pub(crate) struct LeafRules {
    denied: HashSet<Fingerprint>,
    eku_optional: bool,
}

impl LeafRules {
    fn of(trust: &TrustStore) -> LeafRules {
        LeafRules { denied: trust.denied.clone(), eku_optional: trust.eku_optional }
    }

    /// `needed`: the usage the peer's role requires (`"serverAuth"` or `"clientAuth"`).
    fn check(&self, end_entity: &CertificateDer<'_>, needed: &'static str) -> Result<(), rustls::Error> {
        let refused = |e: CertificateError| rustls::Error::InvalidCertificate(e);
        if !self.denied.is_empty() {
            let fp = Fingerprint::of_certificate(end_entity).map_err(|_| refused(CertificateError::BadEncoding))?;
            if self.denied.contains(&fp) {
                return Err(refused(CertificateError::Other(OtherError(Arc::new(DeniedKey(fp))))));
            }
        }
        let (_, cert) =
            x509_parser::parse_x509_certificate(end_entity).map_err(|_| refused(CertificateError::BadEncoding))?;
        // A CA certificate presented as a node's: webpki refuses it too, but this rule runs
        // first and would otherwise name the missing EKU (CA certificates carry none) instead.
        if cert.is_ca() {
            return Err(refused(CertificateError::Other(OtherError(Arc::new(webpki::Error::CaUsedAsEndEntity)))));
        }
        if !self.eku_optional && !matches!(cert.extended_key_usage(), Ok(Some(_))) {
            let missing = MissingExtendedKeyUsage { needed };
            return Err(refused(CertificateError::Other(OtherError(Arc::new(missing)))));
        }
        Ok(())
    }
}

/// Where a connection's verifier records why it refused a certificate.
pub(crate) type Captured = Arc<Mutex<Option<rustls::Error>>>;

pub(crate) fn take_captured(c: &Captured) -> Option<rustls::Error> {
    c.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Verifiers built once per trust store; wrapped per handshake in progress.
pub(crate) struct TlsContext {
    key: Arc<CertifiedKey>,
    verifiers: Arc<Verifiers>,
    rules: Arc<LeafRules>,
    /// Server configurations whose handshakes finished, for the next ones.
    servers: Arc<Idle<QuicServerConfig>>,
    /// Client configurations without a SPIFFE ID to expect, likewise. (Those with one are made
    /// per dial: the ID is part of the verifier.)
    clients: Arc<Idle<QuicClientConfig>>,
}

/// Most configurations of each kind kept for later handshakes; beyond this many finishing at
/// once, the rest are dropped.
const IDLE_CONFIGS: usize = 32;

/// Configurations whose handshakes finished.
type Idle<T> = Mutex<Vec<(Arc<T>, Captured)>>;

/// A TLS configuration lent to one handshake, and where its verifier records refusals.
///
/// [`Lease::finished`] gives it back once the handshake is over, successful or not: the verifier
/// is called only during a handshake, so the next handshake may use it and find `captured`
/// empty. A lease dropped without `finished` (a handshake given up while quinn may still be
/// running it) is not reused, so a late refusal can never be recorded against another
/// handshake.
pub(crate) struct Lease<T> {
    pub(crate) config: Arc<T>,
    pub(crate) captured: Captured,
    home: Option<Arc<Idle<T>>>,
}

impl<T> Lease<T> {
    fn take(home: &Arc<Idle<T>>, make: impl FnOnce() -> Result<(Arc<T>, Captured)>) -> Result<Lease<T>> {
        let idle = home.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let (config, captured) = match idle {
            Some(c) => c,
            None => make()?,
        };
        Ok(Lease { config, captured, home: Some(home.clone()) })
    }

    /// The handshake this configuration served is over: it may serve the next one.
    pub(crate) fn finished(self) {
        let Some(home) = self.home else { return };
        take_captured(&self.captured);
        let mut idle = home.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE_CONFIGS {
            idle.push((self.config, self.captured));
        }
    }
}

/// Checks a peer's certificate chain (leaf first) exactly as a node does in its handshake:
/// the deny-list, then webpki with the trust store's CAs and CRLs at time `now`. With a
/// `server_name`, as a dialler checks the node it dials (name, `serverAuth`); without, as an
/// acceptor checks a dialling node (`clientAuth`). A trust store that cannot make verifiers
/// (no CA, a CRL no CA signed) is its own error; a refused chain is [`Error::Tls`] with rustls'
/// reason.
/// Verification of chains against a trust store, as a node's handshake does it (here, beside
/// the verifiers it uses, so that `identity` does not depend on this module).
impl TrustStore {
    /// Checks a certificate chain (leaf first) exactly as a node's handshake does, now: the
    /// deny-list, then the CAs and CRLs of this store (webpki). With `server_name`, as a node
    /// dialling `server_name` checks the node it reached (`serverAuth` required; a DNS name or
    /// IP address must be a SAN, a SPIFFE ID must be the certificate's one URI SAN, see
    /// [`PeerName`]); without, as a node checks a peer that dialled it (`clientAuth` required).
    ///
    /// Errors are [`Error::Tls`] with [`TlsError::Local`](crate::TlsError::Local) and rustls'
    /// reason (for example `CertificateError::Expired`, `Revoked`, `UnknownIssuer`,
    /// `NotValidForName`, or [`NotTheSvid`] inside `CertificateError::Other`), and
    /// [`Error::InvalidInput`] for a `server_name` that is no [`PeerName`].
    pub fn verify(&self, chain: &[CertificateDer<'static>], server_name: Option<&str>) -> Result<PeerIdentity> {
        self.verify_at(chain, server_name, SystemTime::now())
    }

    /// [`TrustStore::verify`] at a given time.
    pub fn verify_at(
        &self,
        chain: &[CertificateDer<'static>],
        server_name: Option<&str>,
        at: SystemTime,
    ) -> Result<PeerIdentity> {
        let secs = at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let now = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(secs));
        verify_chain(self, chain, server_name, now)?;
        PeerIdentity::from_certificate(&chain[0])
    }
}

fn verify_chain(
    trust: &TrustStore,
    chain: &[CertificateDer<'static>],
    server_name: Option<&str>,
    now: UnixTime,
) -> Result<()> {
    let verifiers = Verifiers::of(trust)?;
    let refused = |error| Error::Tls(crate::error::TlsError::Local { error, alert: None });
    let (end_entity, intermediates) = chain.split_first().ok_or(refused(rustls::Error::NoCertificatesPresented))?;
    let needed = if server_name.is_some() { "serverAuth" } else { "clientAuth" };
    LeafRules::of(trust).check(end_entity, needed).map_err(refused)?;
    let (client_verifier, server_verifier) = verifiers.for_leaf(end_entity).map_err(refused)?;
    match server_name {
        Some(name) => {
            let name = PeerName::parse(name)?;
            let sni = ServerName::try_from(name.tls_name())
                .map_err(|_| refused(rustls::Error::General(format!("not a DNS name or IP address: {name}"))))?;
            match name.spiffe_id() {
                Some(id) => verify_svid(server_verifier, id, end_entity, intermediates, &sni, &[], now),
                None => server_verifier.verify_server_cert(end_entity, intermediates, &sni, &[], now),
            }
            .map(drop)
            .map_err(refused)
        }
        None => client_verifier.verify_client_cert(end_entity, intermediates, now).map(drop).map_err(refused),
    }
}

/// A client and a server verifier over one set of trust anchors.
type Pair = (Arc<dyn ClientCertVerifier>, Arc<WebPkiServerVerifier>);

/// The webpki verifiers of a trust store: one pair over its CAs, and one per SPIFFE trust
/// bundle. A peer's certificate is checked by the pair its SPIFFE ID's trust domain selects
/// ([`Verifiers::for_leaf`]).
#[derive(Debug)]
pub(crate) struct Verifiers {
    /// Over the CAs (`None` when the store has bundles only).
    general: Option<Pair>,
    /// Per trust domain with a bundle.
    domains: HashMap<String, Pair>,
}

/// A certificate carries SPIFFE IDs of more than one trust domain: no bundle can vouch for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the certificate carries SPIFFE IDs of several trust domains ({0:?})")]
pub struct MixedTrustDomains(pub Vec<String>);

impl Verifiers {
    pub(crate) fn of(trust: &TrustStore) -> Result<Verifiers> {
        if trust.cas.is_empty() && trust.bundles.is_empty() {
            return Err(Error::Config("the trust store has no CA certificate".into()));
        }
        let crls = trust.crls_in_force()?;
        let general = if trust.cas.is_empty() { None } else { Some(verifier_pair(&trust.cas, &crls)?) };
        let mut domains = HashMap::new();
        for (domain, cas) in &trust.bundles {
            domains.insert(domain.clone(), verifier_pair(cas, &crls)?);
        }
        Ok(Verifiers { general, domains })
    }

    /// The pair that checks `end_entity`: its trust domain's bundle if its SPIFFE ID names a
    /// domain that has one, else the CAs'.
    pub(crate) fn for_leaf(&self, end_entity: &CertificateDer<'_>) -> Result<&Pair, rustls::Error> {
        if !self.domains.is_empty() {
            let (_, cert) = x509_parser::parse_x509_certificate(end_entity)
                .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
            // (A SAN extension that does not parse selects no bundle; webpki judges it.)
            let mut domains: Vec<String> = Vec::new();
            for domain in uri_sans(&cert).unwrap_or_default().iter().filter_map(|u| trust_domain_of(u)) {
                if !domains.iter().any(|d| d == domain) {
                    domains.push(domain.to_owned());
                }
            }
            if domains.len() > 1 {
                let e = MixedTrustDomains(domains);
                return Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))));
            }
            if let Some(pair) = domains.first().and_then(|d| self.domains.get(d)) {
                return Ok(pair);
            }
        }
        self.general.as_ref().ok_or(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))
    }

    /// The CA names a client certificate request offers: the general CAs' (none with bundles
    /// only).
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.general.as_ref().map_or(&[], |(client, _)| client.root_hint_subjects())
    }
}

/// The webpki verifiers over `cas`, with the CRLs in force.
fn verifier_pair(cas: &[CertificateDer<'static>], crls: &[CertificateRevocationListDer<'static>]) -> Result<Pair> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots
            .add(ca.clone())
            .map_err(|e| Error::Config(format!("CA certificate not usable as a trust anchor: {e}")))?;
    }
    let roots = Arc::new(roots);
    // A CA with no CRL in the store is not revocation-checked; a CRL past its next-update
    // time fails every certificate of its CA (fail closed).
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .with_crls(crls.iter().cloned())
        .allow_unknown_revocation_status()
        .enforce_revocation_expiration()
        .build()
        .map_err(|e| Error::Config(format!("client verifier: {e}")))?;
    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .with_crls(crls.iter().cloned())
        .allow_unknown_revocation_status()
        .enforce_revocation_expiration()
        .build()
        .map_err(|e| Error::Config(format!("server verifier: {e}")))?;
    Ok((client_verifier, server_verifier))
}

impl TlsContext {
    pub(crate) fn new(identity: &Identity, trust: &TrustStore) -> Result<TlsContext> {
        Ok(TlsContext {
            key: identity.key.clone(),
            verifiers: Arc::new(Verifiers::of(trust)?),
            rules: Arc::new(LeafRules::of(trust)),
            servers: Arc::default(),
            clients: Arc::default(),
        })
    }

    /// A server configuration for one incoming connection's handshake.
    pub(crate) fn server_lease(&self) -> Result<Lease<QuicServerConfig>> {
        Lease::take(&self.servers, || self.server_config())
    }

    /// A client configuration for one outgoing connection's handshake; with `spiffe`, see
    /// [`TlsContext::client_config`].
    pub(crate) fn client_lease(&self, spiffe: Option<SpiffeId>) -> Result<Lease<QuicClientConfig>> {
        match spiffe {
            None => Lease::take(&self.clients, || self.client_config(None)),
            Some(id) => {
                let (config, captured) = self.client_config(Some(id))?;
                Ok(Lease { config, captured, home: None })
            }
        }
    }

    /// A new server config, and where its verifier records refusals.
    pub(crate) fn server_config(&self) -> Result<(Arc<QuicServerConfig>, Captured)> {
        let captured = Captured::default();
        let verifier = Arc::new(ClientVerifier {
            inner: self.verifiers.clone(),
            rules: self.rules.clone(),
            captured: captured.clone(),
        });
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(self.key.clone())));
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        cfg.max_early_data_size = 0;
        cfg.send_tls13_tickets = 0;
        cfg.session_storage = Arc::new(NoServerSessionStorage {});
        let quic = QuicServerConfig::try_from(cfg).map_err(|e| Error::Config(e.to_string()))?;
        Ok((Arc::new(quic), captured))
    }

    /// A new client config, and where its verifier records refusals. With `spiffe`, the
    /// server's certificate must be an X.509-SVID for that ID (and its DNS names are not
    /// checked).
    fn client_config(&self, spiffe: Option<SpiffeId>) -> Result<(Arc<QuicClientConfig>, Captured)> {
        let captured = Captured::default();
        let verifier = Arc::new(ServerVerifier {
            inner: self.verifiers.clone(),
            rules: self.rules.clone(),
            captured: captured.clone(),
            spiffe,
        });
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(Resolver(self.key.clone())));
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        cfg.enable_early_data = false;
        cfg.resumption = Resumption::disabled();
        let quic = QuicClientConfig::try_from(cfg).map_err(|e| Error::Config(e.to_string()))?;
        Ok((Arc::new(quic), captured))
    }
}

fn record<T>(captured: &Captured, r: Result<T, rustls::Error>) -> Result<T, rustls::Error> {
    if let Err(e) = &r {
        *captured.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
    }
    r
}

/// The signature methods both verifiers share: TLS 1.2 is never negotiated (QUIC requires TLS
/// 1.3), TLS 1.3 signatures are checked by webpki; every refusal is recorded.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let refused = rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic);
            record(&self.captured, Err(refused))
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algorithms = &provider().signature_verification_algorithms;
            record(&self.captured, rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms))
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider().signature_verification_algorithms.supported_schemes()
        }
    };
}

struct ClientVerifier {
    inner: Arc<Verifiers>,
    rules: Arc<LeafRules>,
    captured: Captured,
}

impl fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("quicseal::ClientVerifier")
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let r = self
            .rules
            .check(end_entity, "clientAuth")
            .and_then(|()| self.inner.for_leaf(end_entity))
            .and_then(|(client, _)| client.verify_client_cert(end_entity, intermediates, now));
        record(&self.captured, r)
    }
    signature_checks!();
}

#[derive(Debug)]
struct ServerVerifier {
    inner: Arc<Verifiers>,
    rules: Arc<LeafRules>,
    captured: Captured,
    /// The SPIFFE ID dialled, if that is what was dialled.
    spiffe: Option<SpiffeId>,
}

/// The chain check (trust anchors, validity, revocation, serverAuth) and then the X.509-SVID
/// check against `expected`. webpki checks the server name only after the chain, so a refusal
/// for the name alone means the chain passed; the name (the trust domain, sent as SNI) is not
/// what a SPIFFE ID is checked by.
fn verify_svid(
    inner: &WebPkiServerVerifier,
    expected: &SpiffeId,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    server_name: &ServerName<'_>,
    ocsp_response: &[u8],
    now: UnixTime,
) -> Result<ServerCertVerified, rustls::Error> {
    match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
        Ok(_)
        | Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => {}
        Err(e) => return Err(e),
    }
    check_svid(expected, end_entity)?;
    Ok(ServerCertVerified::assertion())
}

/// The X.509-SVID rules for a leaf (SPIFFE X509-SVID, sections 4 and 5) that webpki does not
/// check: exactly one URI SAN, equal to `expected`; a key usage that has digitalSignature and
/// neither keyCertSign nor cRLSign. (Not a CA: [`LeafRules`] refuses CA certificates.)
fn check_svid(expected: &SpiffeId, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let refused = |e: CertificateError| rustls::Error::InvalidCertificate(e);
    let (_, cert) =
        x509_parser::parse_x509_certificate(end_entity).map_err(|_| refused(CertificateError::BadEncoding))?;
    let uris = uri_sans(&cert)?;
    let usage = match cert.key_usage() {
        Ok(Some(k)) => Some((k.value.digital_signature(), k.value.key_cert_sign() || k.value.crl_sign())),
        Ok(None) => None,
        Err(_) => return Err(refused(CertificateError::BadEncoding)),
    };
    let problem = if uris.len() != 1 || uris[0] != expected.as_str() {
        Some(format!("its URI SANs are {uris:?}"))
    } else {
        match usage {
            Some((true, false)) => None,
            Some((false, _)) | None => Some("its key usage lacks digitalSignature".to_owned()),
            Some((true, true)) => Some("its key usage allows signing certificates or CRLs".to_owned()),
        }
    };
    match problem {
        None => Ok(()),
        Some(why) => {
            let e = NotTheSvid { expected: expected.to_string(), why };
            Err(refused(CertificateError::Other(OtherError(Arc::new(e)))))
        }
    }
}

/// A certificate's URI SANs; a SAN extension that does not parse is `BadEncoding`.
fn uri_sans<'a>(cert: &x509_parser::certificate::X509Certificate<'a>) -> Result<Vec<&'a str>, rustls::Error> {
    match cert.subject_alternative_name() {
        Ok(Some(san)) => Ok(san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect()),
        Ok(None) => Ok(Vec::new()),
        Err(_) => Err(rustls::Error::InvalidCertificate(CertificateError::BadEncoding)),
    }
}

/// A dialled peer's certificate is not an X.509-SVID for the SPIFFE ID that was dialled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the certificate is not an X.509-SVID for {expected}: {why}")]
pub struct NotTheSvid {
    /// The SPIFFE ID dialled.
    pub expected: String,
    /// What is wrong with the certificate.
    pub why: String,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let r = self.rules.check(end_entity, "serverAuth").and_then(|()| self.inner.for_leaf(end_entity)).and_then(
            |(_, server)| match &self.spiffe {
                Some(id) => verify_svid(server, id, end_entity, intermediates, server_name, ocsp_response, now),
                None => server.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now),
            },
        );
        record(&self.captured, r)
    }
    signature_checks!();
}

/// Presents this node's certificate, as a server and as a client.
#[derive(Debug)]
struct Resolver(Arc<CertifiedKey>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.key.choose_scheme(sigschemes).map(|_| self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, KeyType, NodeCert};

    fn context() -> TlsContext {
        let ca = Ca::new("lease CA", KeyType::EcdsaP256, Duration::from_secs(3600)).unwrap();
        let issued = ca.issue(&NodeCert::new("a").dns("a.example")).unwrap();
        let identity = Identity::from_pem(issued.chain_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
        let mut trust = TrustStore::new();
        trust.add_ca_pem(ca.cert_pem().as_bytes()).unwrap();
        TlsContext::new(&identity, &trust).unwrap()
    }

    fn refused(captured: &Captured) {
        *captured.lock().unwrap() = Some(rustls::Error::NoCertificatesPresented);
    }

    #[test]
    fn a_finished_lease_serves_the_next_handshake_with_no_refusal_left_in_it() {
        let tls = context();
        let first = tls.server_lease().unwrap();
        let config = first.config.clone();
        refused(&first.captured);
        first.finished();
        let next = tls.server_lease().unwrap();
        assert!(Arc::ptr_eq(&next.config, &config), "the finished configuration is reused");
        assert!(take_captured(&next.captured).is_none(), "the last handshake's refusal is gone");
        // Two handshakes at once never share a configuration.
        let other = tls.server_lease().unwrap();
        assert!(!Arc::ptr_eq(&other.config, &next.config));
        assert!(!Arc::ptr_eq(&other.captured, &next.captured));
        let client = tls.client_lease(None).unwrap();
        let config = client.config.clone();
        client.finished();
        assert!(Arc::ptr_eq(&tls.client_lease(None).unwrap().config, &config));
    }

    #[test]
    fn a_lease_given_up_or_expecting_a_spiffe_id_is_not_reused() {
        let tls = context();
        // Dropped without `finished`: quinn may still run that handshake and call its verifier.
        let abandoned = tls.server_lease().unwrap();
        let config = abandoned.config.clone();
        drop(abandoned);
        assert!(!Arc::ptr_eq(&tls.server_lease().unwrap().config, &config));
        let id: SpiffeId = "spiffe://example.org/a".parse().unwrap();
        let spiffe = tls.client_lease(Some(id.clone())).unwrap();
        let config = spiffe.config.clone();
        spiffe.finished();
        assert!(!Arc::ptr_eq(&tls.client_lease(Some(id)).unwrap().config, &config));
        assert!(!Arc::ptr_eq(&tls.client_lease(None).unwrap().config, &config));
    }

    #[test]
    fn at_most_idle_configs_wait_for_later_handshakes() {
        let tls = context();
        let leases: Vec<_> = (0..IDLE_CONFIGS + 5).map(|_| tls.server_lease().unwrap()).collect();
        for lease in leases {
            lease.finished();
        }
        assert_eq!(tls.servers.lock().unwrap().len(), IDLE_CONFIGS);
    }
}
