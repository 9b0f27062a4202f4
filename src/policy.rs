//! Authorization: which authenticated peers may talk to us.
//!
//! TLS proves *who* the peer is (a certificate from our CA); the policy decides whether that
//! peer is *allowed*. It runs after the handshake, on both sides of every connection. A peer it
//! refuses is closed with close code `UNAUTHORIZED` and learns nothing more; the local error
//! says which rule failed.

use std::fmt;
use std::sync::Arc;

use crate::identity::{Fingerprint, PeerIdentity};

type Check = dyn Fn(&PeerIdentity) -> bool + Send + Sync;

enum Rule {
    Name(String),
    TrustDomain(String),
    Fingerprint(Fingerprint),
    Custom(Arc<Check>),
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Name(n) => write!(f, "name {n:?}"),
            Rule::TrustDomain(d) => write!(f, "SPIFFE trust domain {d:?}"),
            Rule::Fingerprint(fp) => write!(f, "key {fp}"),
            Rule::Custom(_) => f.write_str("custom check"),
        }
    }
}

/// An allow-list of peers. A peer is allowed when **any** rule matches.
///
/// [`Policy::any_authenticated`] (the default) allows every peer whose certificate chains to
/// the trust store. Adding a rule switches to allow-list mode.
///
/// ```
/// use quicseal::Policy;
/// let policy = Policy::allow_list()
///     .allow_name("db-1.internal")
///     .allow_spiffe_trust_domain("example.org")
///     .allow_fn(|peer| peer.common_name.as_deref() == Some("ops"));
/// ```
#[derive(Clone, Default)]
pub struct Policy {
    rules: Option<Vec<Arc<Rule>>>,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rules {
            None => f.write_str("Policy(any authenticated peer)"),
            Some(r) => f.debug_tuple("Policy").field(r).finish(),
        }
    }
}

impl Policy {
    /// Allows every peer with a certificate the trust store accepts.
    pub fn any_authenticated() -> Policy {
        Policy { rules: None }
    }

    /// An empty allow-list: refuses everyone until rules are added.
    pub fn allow_list() -> Policy {
        Policy { rules: Some(Vec::new()) }
    }

    fn with(mut self, rule: Rule) -> Policy {
        self.rules.get_or_insert_with(Vec::new).push(Arc::new(rule));
        self
    }

    /// Allows a peer that has this DNS name, IP address or URI SAN, or this common name.
    pub fn allow_name(self, name: impl Into<String>) -> Policy {
        self.with(Rule::Name(name.into()))
    }

    /// Allows a peer whose SPIFFE ID (`spiffe://DOMAIN/...` URI SAN) is in this trust domain.
    pub fn allow_spiffe_trust_domain(self, domain: impl Into<String>) -> Policy {
        self.with(Rule::TrustDomain(domain.into()))
    }

    /// Allows the peer whose public key has this fingerprint.
    pub fn allow_fingerprint(self, fingerprint: Fingerprint) -> Policy {
        self.with(Rule::Fingerprint(fingerprint))
    }

    /// Allows a peer for which `check` returns true.
    pub fn allow_fn(self, check: impl Fn(&PeerIdentity) -> bool + Send + Sync + 'static) -> Policy {
        self.with(Rule::Custom(Arc::new(check)))
    }

    /// Decides on a peer: `Err` carries the local explanation.
    pub fn check(&self, peer: &PeerIdentity) -> Result<(), String> {
        let Some(rules) = &self.rules else {
            return Ok(());
        };
        let allowed = rules.iter().any(|rule| match &**rule {
            Rule::Name(n) => peer.has_name(n),
            Rule::TrustDomain(d) => peer.spiffe_trust_domain() == Some(d.as_str()),
            Rule::Fingerprint(fp) => peer.fingerprint == *fp,
            Rule::Custom(check) => check(peer),
        });
        if allowed {
            Ok(())
        } else {
            Err(format!("peer {peer} matches none of the {} policy rules {rules:?}", rules.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn peer() -> PeerIdentity {
        PeerIdentity {
            dns_names: vec!["a.example".into()],
            ip_addresses: vec![],
            uris: vec!["spiffe://example.org/node/a".into()],
            common_name: Some("a".into()),
            fingerprint: Fingerprint([7; 32]),
            names_digest: Fingerprint([8; 32]),
            not_after: UNIX_EPOCH,
        }
    }

    #[test]
    fn rules() {
        let p = peer();
        assert!(Policy::any_authenticated().check(&p).is_ok());
        assert!(Policy::allow_list().check(&p).is_err());
        assert!(Policy::allow_list().allow_name("A.example").check(&p).is_ok());
        assert!(Policy::allow_list().allow_name("b.example").check(&p).is_err());
        assert!(Policy::allow_list().allow_spiffe_trust_domain("example.org").check(&p).is_ok());
        assert!(Policy::allow_list().allow_spiffe_trust_domain("example.com").check(&p).is_err());
        assert!(Policy::allow_list().allow_fingerprint(Fingerprint([7; 32])).check(&p).is_ok());
        assert!(Policy::allow_list().allow_fingerprint(Fingerprint([8; 32])).check(&p).is_err());
        assert!(Policy::allow_list().allow_fn(|_| false).allow_name("a").check(&p).is_ok());
        let err = Policy::allow_list().allow_fn(|_| false).check(&p).unwrap_err();
        assert!(err.contains("custom check"), "{err}");
    }
}
