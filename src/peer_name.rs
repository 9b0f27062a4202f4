//! Who a dialler expects to reach: a DNS name, an IP address, or a SPIFFE ID
//! ([`PeerName`]), and SPIFFE IDs themselves ([`SpiffeId`]).
//!
//! A SPIFFE ID is read as the SPIFFE specification (SPIFFE-ID, section 2) writes it:
//! `spiffe://` (lower case), a trust domain of lower-case letters, digits, `.`, `-` and `_`, then
//! an optional path of non-empty segments of letters, digits, `.`, `-` and `_` (no `.` or `..`
//! segment, no trailing `/`), with no port, user, query or fragment, at most 2,048 bytes.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The longest SPIFFE ID accepted (the specification's limit).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// A SPIFFE ID: `spiffe://trust-domain/path`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID, checked.
    id: String,
    /// Where the trust domain ends in `id` (the path starts there).
    domain_end: usize,
}

impl SpiffeId {
    /// Reads a SPIFFE ID; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<SpiffeId> {
        let bad = |why: &str| Error::InvalidInput(format!("not a SPIFFE ID ({why}): {text:?}"));
        if text.len() > MAX_SPIFFE_ID_LEN {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = text.strip_prefix("spiffe://").ok_or_else(|| bad("it must start with spiffe://"))?;
        let domain_len = rest.find('/').unwrap_or(rest.len());
        let (domain, path) = rest.split_at(domain_len);
        if domain.is_empty() {
            return Err(bad("the trust domain is empty"));
        }
        if let Some(c) = domain.chars().find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c)))
        {
            return Err(bad(&format!(
                "the trust domain may hold lower-case letters, digits, '.', '-' and '_', not {c:?}"
            )));
        }
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                match segment {
                    "" => return Err(bad("the path has an empty segment or a trailing '/'")),
                    "." | ".." => return Err(bad("the path has a '.' or '..' segment")),
                    s => {
                        if let Some(c) = s.chars().find(|&c| !(c.is_ascii_alphanumeric() || ".-_".contains(c))) {
                            return Err(bad(&format!(
                                "the path may hold letters, digits, '.', '-', '_' and '/', not {c:?}"
                            )));
                        }
                    }
                }
            }
        }
        Ok(SpiffeId { id: text.to_owned(), domain_end: "spiffe://".len() + domain_len })
    }

    /// The trust domain, such as `example.org`.
    pub fn trust_domain(&self) -> &str {
        &self.id["spiffe://".len()..self.domain_end]
    }

    /// The path, such as `/ns/default/sa/node-b` (empty for the trust domain's own ID).
    pub fn path(&self) -> &str {
        &self.id[self.domain_end..]
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The name a dialler sends in TLS's server name indication when it dials this ID: the
    /// trust domain when that is a valid DNS name, else `spiffe.invalid` (the ID itself is not
    /// sent in the clear; the certificate is checked against the whole ID).
    pub(crate) fn sni(&self) -> &str {
        let domain = self.trust_domain();
        if rustls_pki_types::DnsName::try_from(domain).is_ok() { domain } else { "spiffe.invalid" }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<SpiffeId> {
        SpiffeId::parse(s)
    }
}

/// The trust domain a `spiffe://` URI names (`example.org` in `spiffe://example.org/node/a`),
/// read as a certificate carries it (not checked as a [`SpiffeId`]); `None` for another URI.
pub(crate) fn trust_domain_of(uri: &str) -> Option<&str> {
    let rest = uri.strip_prefix("spiffe://")?;
    Some(rest.split('/').next().unwrap_or(rest))
}

/// The identity a dialler expects its peer's certificate to prove.
///
/// Read from text by [`PeerName::parse`]: `spiffe://...` is a SPIFFE ID (no DNS name or IP
/// address can contain `://`, so nothing is guessed), an IP address is an IP address, and
/// anything else must be a valid DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PeerName {
    /// A DNS name: the certificate must carry it as a DNS SAN (webpki's check).
    Dns(String),
    /// An IP address: the certificate must carry it as an IP SAN.
    Ip(IpAddr),
    /// A SPIFFE ID: the certificate must be an X.509-SVID for exactly this ID (one URI SAN,
    /// equal to it; a leaf whose key usage allows signatures and not certificate or CRL
    /// signing). DNS names are not checked then.
    Spiffe(SpiffeId),
}

impl PeerName {
    /// Reads an expected peer name (see the type's docs).
    pub fn parse(text: &str) -> Result<PeerName> {
        if text.contains("://") {
            return SpiffeId::parse(text).map(PeerName::Spiffe);
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(PeerName::Ip(ip));
        }
        match rustls_pki_types::DnsName::try_from(text) {
            Ok(_) => Ok(PeerName::Dns(text.to_owned())),
            Err(_) => Err(Error::InvalidInput(format!(
                "not a DNS name, an IP address or a SPIFFE ID (spiffe://...): {text:?}"
            ))),
        }
    }

    /// The SPIFFE ID, for a SPIFFE name.
    pub fn spiffe_id(&self) -> Option<&SpiffeId> {
        match self {
            PeerName::Spiffe(id) => Some(id),
            _ => None,
        }
    }

    /// The server name the TLS handshake is made with (see [`SpiffeId`] for a SPIFFE ID's).
    pub(crate) fn tls_name(&self) -> String {
        match self {
            PeerName::Dns(d) => d.clone(),
            PeerName::Ip(ip) => ip.to_string(),
            PeerName::Spiffe(id) => id.sni().to_owned(),
        }
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerName::Dns(d) => f.write_str(d),
            PeerName::Ip(ip) => write!(f, "{ip}"),
            PeerName::Spiffe(id) => write!(f, "{id}"),
        }
    }
}

impl FromStr for PeerName {
    type Err = Error;
    fn from_str(s: &str) -> Result<PeerName> {
        PeerName::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_are_read_as_the_specification_writes_them() {
        let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/node-b").unwrap();
        assert_eq!((id.trust_domain(), id.path()), ("example.org", "/ns/default/sa/node-b"));
        assert_eq!(id.to_string(), "spiffe://example.org/ns/default/sa/node-b");
        assert_eq!(id.sni(), "example.org");
        let bare = SpiffeId::parse("spiffe://td_1").unwrap();
        assert_eq!((bare.trust_domain(), bare.path()), ("td_1", ""));
        assert_eq!(bare.sni(), "td_1");
        let odd = SpiffeId::parse("spiffe://a..b/x").unwrap();
        assert_eq!(odd.sni(), "spiffe.invalid", "an empty label is not valid in a DNS name");
        for bad in [
            "https://example.org/a",
            "SPIFFE://example.org/a",
            "spiffe://",
            "spiffe:///a",
            "spiffe://Example.org/a",
            "spiffe://example.org:8080/a",
            "spiffe://user@example.org/a",
            "spiffe://example.org/",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/./b",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a?x=1",
            "spiffe://example.org/a#f",
            "spiffe://example.org/a b",
        ] {
            let e = SpiffeId::parse(bad).unwrap_err();
            assert!(matches!(&e, Error::InvalidInput(m) if m.contains("not a SPIFFE ID")), "{bad}: {e}");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert!(SpiffeId::parse(&long).is_err());
    }

    #[test]
    fn peer_names_are_told_apart_by_their_form() {
        assert_eq!(PeerName::parse("node-b").unwrap(), PeerName::Dns("node-b".into()));
        assert_eq!(PeerName::parse("127.0.0.1").unwrap(), PeerName::Ip([127, 0, 0, 1].into()));
        assert_eq!(PeerName::parse("::1").unwrap(), PeerName::Ip("::1".parse().unwrap()));
        let spiffe = PeerName::parse("spiffe://example.org/b").unwrap();
        assert_eq!(spiffe.spiffe_id().map(SpiffeId::as_str), Some("spiffe://example.org/b"));
        assert_eq!(spiffe.to_string(), "spiffe://example.org/b");
        assert_eq!(spiffe.tls_name(), "example.org");
        // A URI of another scheme is not taken for a DNS name.
        assert!(PeerName::parse("https://example.org").is_err());
        assert!(PeerName::parse("not a name").is_err());
    }
}
