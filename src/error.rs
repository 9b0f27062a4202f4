//! The one error type of quicseal, with kinds a caller can match.
//!
//! Errors come in layers, as in rustls: the peer misbehaved ([`Error::ProtocolViolation`] with
//! [`Side::Local`]), the peer refused us ([`Error::Unauthorized`] with [`Side::Remote`], or
//! [`TlsError::Remote`]), the caller misused the API ([`Error::MessageTooLarge`], [`Error::Limit`],
//! [`Error::InvalidInput`]), or the configuration is wrong ([`Error::Config`], [`Error::Load`]). Details that help an
//! operator stay in the local error; what is sent to the peer is only a close code.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::AlertDescription;

pub use crate::proto::close_code;
pub use crate::proto::violation::Violation;

/// Which end of a connection made a decision (refused a certificate, found a violation...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// This node decided.
    Local,
    /// The peer decided and told us (through a TLS alert or a close code).
    Remote,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Local => "this node",
            Side::Remote => "the peer",
        })
    }
}

/// Why a mutual-TLS handshake failed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum TlsError {
    /// This node refused the handshake, usually the peer's certificate.
    ///
    /// `error` is rustls' own typed reason (for example
    /// `InvalidCertificate(CertificateError::UnknownIssuer)`, `NoCertificatesPresented`,
    /// `BadSignature`); `alert` is what the peer was told.
    Local {
        /// rustls' reason.
        error: rustls::Error,
        /// The TLS alert sent to the peer, when one was.
        alert: Option<AlertDescription>,
    },
    /// The peer refused the handshake and sent this TLS alert (for example `UnknownCA`,
    /// `CertificateRequired`, `BadCertificate`).
    Remote {
        /// The alert the peer sent.
        alert: AlertDescription,
    },
}

impl TlsError {
    /// Why, as a sentence for an operator, without who refused: rustls' and webpki's reasons
    /// in words (`the certificate does not chain to a trusted CA`, `a CA certificate was
    /// presented as a node certificate`...), and what a peer's alert usually means.
    pub fn reason(&self) -> String {
        match self {
            TlsError::Local { error, .. } => describe_rustls(error),
            TlsError::Remote { alert } => {
                let hint = match alert {
                    AlertDescription::UnknownCA => " (it does not trust the CA of our certificate)",
                    AlertDescription::BadCertificate => " (it refused our certificate)",
                    AlertDescription::CertificateExpired => " (our certificate expired, or it is not valid yet)",
                    AlertDescription::CertificateRevoked => " (our certificate is revoked)",
                    AlertDescription::CertificateRequired => " (we presented no certificate)",
                    AlertDescription::UnsupportedCertificate => {
                        " (our certificate's key usage does not allow this role)"
                    }
                    AlertDescription::NoApplicationProtocol => " (it does not speak quicseal/1)",
                    _ => "",
                };
                format!("alert {alert:?}{hint}")
            }
        }
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Local { .. } => write!(f, "this node refused the handshake: {}", self.reason()),
            TlsError::Remote { .. } => write!(f, "the peer refused the handshake with {}", self.reason()),
        }
    }
}

/// rustls' reason for refusing a certificate, as a sentence: its own text where that already
/// is one, words for the reasons it prints as a `Debug` dump.
fn describe_rustls(error: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let time = |t: &rustls::pki_types::UnixTime| {
        let secs = i64::try_from(t.as_secs()).unwrap_or(i64::MAX);
        x509_parser::time::ASN1Time::from_timestamp(secs)
            .ok()
            .and_then(|t| t.to_rfc2822().ok())
            .unwrap_or_else(|| format!("{secs} (Unix time)"))
    };
    let certificate = match error {
        rustls::Error::InvalidCertificate(c) => c,
        rustls::Error::NoCertificatesPresented => return "the peer presented no certificate".into(),
        other => return other.to_string(),
    };
    match certificate {
        C::BadEncoding => "the certificate is not valid DER".into(),
        C::Expired => "the certificate expired".into(),
        C::ExpiredContext { not_after, .. } => format!("the certificate expired on {}", time(not_after)),
        C::NotValidYet => "the certificate is not valid yet".into(),
        C::NotValidYetContext { not_before, .. } => format!("the certificate is not valid before {}", time(not_before)),
        C::Revoked => "the certificate is revoked (a loaded CRL lists it)".into(),
        C::UnknownIssuer => "the certificate does not chain to a trusted CA (unknown issuer)".into(),
        C::BadSignature => "the certificate's signature does not verify".into(),
        C::ExpiredRevocationList | C::ExpiredRevocationListContext { .. } => {
            "the CA's CRL is past its next update, so every certificate of that CA is refused: publish a new \
             CRL (`quicseal cert crl`)"
                .into()
        }
        C::NotValidForName => "the certificate is not valid for the expected name".into(),
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => format!(
            "the certificate's extended key usage does not allow this role (accepting needs serverAuth, \
             dialling clientAuth): {certificate}"
        ),
        C::Other(other) => match other.0.downcast_ref::<webpki::Error>() {
            Some(webpki::Error::CaUsedAsEndEntity) => {
                "a CA certificate was presented as a node certificate: present a node certificate issued by the \
                 CA"
                .into()
            }
            Some(webpki::Error::EndEntityUsedAsCa) => "a node certificate was used as the issuer of another".into(),
            Some(webpki::Error::RequiredEkuNotFoundContext(_)) => {
                "the certificate's extended key usage does not allow this role (accepting needs serverAuth, \
                 dialling clientAuth)"
                    .into()
            }
            Some(webpki::Error::NameConstraintViolation) => "the certificate violates its CA's name constraints".into(),
            Some(webpki::Error::PathLenConstraintViolated) => {
                "the chain is longer than a CA's path length constraint allows".into()
            }
            Some(webpki::Error::InvalidSignatureForPublicKey) => "the certificate's signature does not verify".into(),
            Some(webpki::Error::UnsupportedCriticalExtension) => {
                "the certificate has a critical extension quicseal does not handle".into()
            }
            // Our own reasons (deny-list, missing EKU) are sentences already.
            _ => other.to_string(),
        },
        other => other.to_string(),
    }
}

/// What timed out ([`Error::Timeout`]): a kind to match, never a string to compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Timed {
    /// A dial got no answer within `Limits::handshake_timeout`: no quicseal node at that
    /// address (nothing listening there), or the path drops UDP.
    NoAnswer,
    /// The peer answered, but the TLS handshake and the quicseal hello did not finish within
    /// `Limits::handshake_timeout`.
    Handshake,
    /// A connection was silent for `Limits::idle_timeout`.
    ConnectionIdle,
    /// A disconnected session was not resumed within `Limits::resume_timeout`.
    SessionResumption,
    /// An RPC call's deadline passed at the caller.
    RpcCall,
    /// An RPC call's deadline passed at the server, which stopped waiting for its handler.
    RpcDeadlineAtServer,
    /// An end-to-end receipt ([`Session::delivered`](crate::Session::delivered)) did not
    /// arrive within a deadline the application set (quicseal itself puts none on it).
    Receipt,
}

impl Timed {
    /// Whether a new connection may cure it: the network or the peer's availability, not a
    /// deadline the caller chose.
    pub fn is_transient(self) -> bool {
        matches!(self, Timed::NoAnswer | Timed::Handshake | Timed::ConnectionIdle | Timed::SessionResumption)
    }
}

impl fmt::Display for Timed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Timed::NoAnswer => {
                "handshake: no quicseal node answered at that address (nothing listening there, or the path drops UDP)"
            }
            Timed::Handshake => "handshake: the TLS handshake and quicseal hello did not finish in time",
            Timed::ConnectionIdle => "connection idle",
            Timed::SessionResumption => "session resumption",
            Timed::RpcCall => "RPC call",
            Timed::RpcDeadlineAtServer => "RPC call (the deadline passed at the server)",
            Timed::Receipt => "waiting for the peer's receipt",
        })
    }
}

/// What was wrong with a certificate, key or CRL file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoadProblem {
    /// The file could not be read (missing, permissions...).
    Unreadable(String),
    /// The file holds no PEM section at all, or malformed PEM.
    NotPem(String),
    /// The file holds PEM sections, but none of the expected type.
    WrongPemType {
        /// What we looked for, e.g. `CERTIFICATE`.
        expected: &'static str,
        /// What the file holds.
        found: Vec<String>,
    },
    /// A section of the right type whose contents do not parse.
    Invalid(String),
    /// The private key does not belong to the certificate.
    KeyMismatch,
}

impl fmt::Display for LoadProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadProblem::Unreadable(e) => write!(f, "cannot read it: {e}"),
            LoadProblem::NotPem(e) => write!(f, "not PEM: {e}"),
            LoadProblem::WrongPemType { expected, found } => {
                write!(f, "expected a PEM `{expected}` section, found ")?;
                if found.is_empty() { f.write_str("none") } else { write!(f, "{}", found.join(", ")) }
            }
            LoadProblem::Invalid(e) => write!(f, "invalid contents: {e}"),
            LoadProblem::KeyMismatch => f.write_str("the private key does not match the certificate"),
        }
    }
}

/// A certificate, key or CRL that could not be loaded, with the file it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {problem}", path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "<memory>".into()))]
pub struct LoadError {
    /// The file, when the material came from a file.
    pub path: Option<PathBuf>,
    /// What was wrong.
    pub problem: LoadProblem,
}

/// Every error quicseal returns. `Clone`, so that every caller waiting on a session that ended
/// gets the same error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The mutual-TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(TlsError),
    /// The authorization policy refused a fully authenticated peer.
    ///
    /// With [`Side::Local`], our policy refused the peer and `reason` says why. With
    /// [`Side::Remote`], the peer's policy refused us; peers are told nothing more than that.
    #[error("unauthorized: {side} refused the connection: {reason}")]
    Unauthorized {
        /// Who refused.
        side: Side,
        /// Why (detailed only for [`Side::Local`]).
        reason: String,
    },
    /// The peer does not speak `quicseal/1`: no common ALPN protocol (refused in the TLS
    /// handshake by either side), or a peer that negotiated none.
    #[error("ALPN mismatch: the peer does not speak quicseal/1 (negotiated {negotiated:?})")]
    AlpnMismatch {
        /// What was negotiated, if anything.
        negotiated: Option<String>,
    },
    /// An operation did not finish in time; `what` says which, as a kind to match.
    #[error("timed out: {what}")]
    Timeout {
        /// What timed out.
        what: Timed,
    },
    /// The connection ended (closed by the peer, reset, network gone).
    #[error("connection lost: {reason}")]
    ConnectionLost {
        /// What happened, as far as we know.
        reason: String,
    },
    /// The peer refused the connection before the handshake (too many connections or
    /// handshakes, shutting down): a later attempt may succeed.
    #[error("connection refused by the peer")]
    Refused,
    /// A peer broke the quicseal protocol.
    ///
    /// [`Side::Local`]: the peer sent something malformed and we closed the connection with
    /// `violation.close_code()`. [`Side::Remote`]: the peer says we did.
    #[error("protocol violation detected by {side}: {violation}")]
    ProtocolViolation {
        /// Who detected it.
        side: Side,
        /// What was wrong.
        violation: Violation,
    },
    /// A message is larger than the limit (ours, or the one the peer announced).
    #[error("message too large: {size} bytes, limit {limit}")]
    MessageTooLarge {
        /// Size of the refused message.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// Datagrams cannot be sent on this session: the peer or the path does not support QUIC
    /// DATAGRAM frames, or they are turned off.
    #[error("datagrams unsupported: {0}")]
    DatagramsUnsupported(&'static str),
    /// The outbox is full of unacknowledged messages ([`Session::try_send_bytes`](crate::Session::try_send_bytes));
    /// [`Session::send_bytes`](crate::Session::send_bytes) waits instead.
    #[error("outbox full: {messages} messages, {bytes} bytes not yet acknowledged")]
    Full {
        /// Unacknowledged messages.
        messages: usize,
        /// Unacknowledged bytes.
        bytes: usize,
    },
    /// A configured resource limit was reached (connections, channels...).
    #[error("limit reached: {what} (at most {limit})")]
    Limit {
        /// Which limit.
        what: Limited,
        /// Its value.
        limit: u64,
    },
    /// The server answered an RPC call with an error: the handler's application error, or one
    /// of the server's refusals (unknown method, overloaded, handler panic...). The session and
    /// the server are fine; compare transport failures ([`Error::ConnectionLost`],
    /// [`Error::Timeout`]).
    #[error("remote: {0}")]
    Remote(RemoteError),
    /// Channels 0xFFFD (durable channels) and 0xFFFE and 0xFFFF (RPC) are the library's;
    /// applications cannot send on them.
    #[error("channel {0:#06x} is reserved (durable channels and RPC)")]
    ReservedChannel(u16),
    /// A typed message could not be encoded or decoded.
    #[error("message encoding: {0}")]
    Encoding(#[from] postcard::Error),
    /// A certificate, key or CRL could not be loaded.
    #[error("loading {0}")]
    Load(#[from] LoadError),
    /// The configuration is not usable ([`NodeConfig`](crate::NodeConfig), [`Limits`](crate::Limits),
    /// a [`Router`](crate::Router)'s limits, the trust material a node is given).
    #[error("configuration: {0}")]
    Config(String),
    /// An argument is not valid: a name that is not a DNS name, bytes that are not a
    /// certificate, an RPC method name that is too long, a call identity already in use.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Something that should not fail did (the system's random number generator, the TLS
    /// exporter): a bug or a broken platform, not the caller's doing.
    #[error("internal error: {0}")]
    Internal(String),
    /// A file quicseal reads or writes (a CA directory's, for example) could not be used.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file or directory.
        path: PathBuf,
        /// What was wrong, and what to do about it.
        reason: String,
    },
    /// The durable store failed (see [`StoreError`](crate::store::StoreError)).
    #[error("durable store: {0}")]
    Store(crate::store::StoreError),
    /// The SPIFFE Workload API (a SPIRE agent's socket) could not be reached in time, or what
    /// it served could not be used (feature `workload-api`, see `quicseal::workload_api`).
    #[error("SPIFFE Workload API: {0}")]
    WorkloadApi(String),
    /// The node or session was closed by this process.
    #[error("closed")]
    Closed,
    /// An operating-system I/O error (binding a socket...), shared so that the error is `Clone`.
    #[error("I/O: {0}")]
    Io(Arc<io::Error>),
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(Arc::new(e))
    }
}

/// An error a handler returns on purpose: an application-defined code and a message. The
/// caller receives it as [`Error::Remote`]`(`[`RemoteError::Application`]`)`. Messages longer than
/// 1,024 bytes are cut.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("application error {code}: {message}")]
pub struct ApplicationError {
    /// Application-defined code.
    pub code: u32,
    /// Human-readable message.
    pub message: String,
}

impl ApplicationError {
    /// An application error.
    pub fn new(code: u32, message: impl Into<String>) -> ApplicationError {
        ApplicationError { code, message: message.into() }
    }
}

/// How the server ended a call other than with a response: [`Error::Remote`] carries it. These
/// are answers from a working server, distinct from transport failures (the session ending,
/// [`Error::Timeout`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The handler returned an application error.
    #[error("{0}")]
    Application(ApplicationError),
    /// The server has no handler for the method (or serves no RPC at all).
    #[error("unknown method")]
    UnknownMethod,
    /// The server's per-session or per-node concurrency limit, or its call cache, was full.
    /// Nothing ran; trying again later may succeed.
    #[error("the server is overloaded")]
    Overloaded,
    /// The handler panicked; the server carried on.
    #[error("the handler panicked")]
    HandlerPanicked,
    /// The request body is larger than the server accepts ([`RouterConfig::max_request_size`](crate::RouterConfig::max_request_size)).
    #[error("request too large for the server")]
    RequestTooLarge,
    /// The request body does not decode as the method's request type.
    #[error("invalid request for this method")]
    InvalidRequest,
    /// The handler ran but its response could not be sent (it did not encode, or it was larger
    /// than the message size limit).
    #[error("the server could not send the response")]
    Internal,
    /// The call was cancelled before it finished (a retry of a cancelled call gets this).
    #[error("the call was cancelled")]
    Cancelled,
}

/// Which limit [`Error::Limit`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limited {
    /// Connections a node holds (`Limits::max_connections`).
    ConnectionsPerNode,
    /// Connections one peer may hold with a node (`Limits::max_connections_per_peer`).
    ConnectionsPerPeer,
    /// Application channels one session opens (`Limits::max_channels`, or the peer's, if
    /// smaller).
    ChannelsPerSession,
    /// Datagram channels one session uses.
    DatagramChannelsPerSession,
    /// Sequence numbers of one channel in one session epoch.
    SequenceNumbers,
}

impl fmt::Display for Limited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limited::ConnectionsPerNode => "connections per node",
            Limited::ConnectionsPerPeer => "connections per peer",
            Limited::ChannelsPerSession => "channels per session",
            Limited::DatagramChannelsPerSession => "datagram channels per session",
            Limited::SequenceNumbers => "sequence numbers in this epoch",
        })
    }
}

/// The result type of quicseal.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The first TLS alert code, as QUIC carries it in a transport error (RFC 9001, section 4.8).
const CRYPTO_ERROR_BASE: u64 = 0x100;

/// Maps a quinn connection error to ours. `captured` is the typed rustls error our verifier
/// recorded for this connection, if any.
pub(crate) fn from_connection_error(err: quinn::ConnectionError, captured: Option<rustls::Error>) -> Error {
    use quinn::ConnectionError as C;
    match err {
        C::TransportError(t) => {
            let code = u64::from(t.code);
            if (CRYPTO_ERROR_BASE..CRYPTO_ERROR_BASE + 0x100).contains(&code) {
                let alert = AlertDescription::from((code - CRYPTO_ERROR_BASE) as u8);
                if alert == AlertDescription::NoApplicationProtocol {
                    return Error::AlpnMismatch { negotiated: None };
                }
                let error = captured.unwrap_or_else(|| rustls_error_for(alert, &t.reason));
                Error::Tls(TlsError::Local { error, alert: Some(alert) })
            } else {
                Error::ProtocolViolation { side: Side::Local, violation: Violation::Transport(t.to_string()) }
            }
        }
        C::ConnectionClosed(c) => {
            let code = u64::from(c.error_code);
            if (CRYPTO_ERROR_BASE..CRYPTO_ERROR_BASE + 0x100).contains(&code) {
                match AlertDescription::from((code - CRYPTO_ERROR_BASE) as u8) {
                    AlertDescription::NoApplicationProtocol => Error::AlpnMismatch { negotiated: None },
                    alert => Error::Tls(TlsError::Remote { alert }),
                }
            } else if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED {
                Error::Refused
            } else {
                Error::ProtocolViolation {
                    side: Side::Remote,
                    violation: Violation::Transport(format!("the peer closed with {}", c.error_code)),
                }
            }
        }
        C::ApplicationClosed(a) => from_application_close(u64::from(a.error_code), &a.reason),
        C::TimedOut => Error::Timeout { what: Timed::ConnectionIdle },
        C::LocallyClosed => Error::Closed,
        C::Reset => Error::ConnectionLost { reason: "reset by the peer".into() },
        C::VersionMismatch => Error::ConnectionLost { reason: "QUIC version mismatch".into() },
        C::CidsExhausted => Error::ConnectionLost { reason: "connection IDs exhausted".into() },
    }
}

fn from_application_close(code: u64, reason: &[u8]) -> Error {
    let reason = String::from_utf8_lossy(reason).into_owned();
    match u32::try_from(code) {
        Ok(close_code::UNAUTHORIZED) => Error::Unauthorized { side: Side::Remote, reason },
        Ok(code @ close_code::PROTOCOL_VIOLATION) => {
            Error::ProtocolViolation { side: Side::Remote, violation: Violation::Reported { code, reason } }
        }
        Ok(close_code::HELLO_TIMEOUT) => {
            Error::ProtocolViolation { side: Side::Remote, violation: Violation::HelloTimeout }
        }
        Ok(code @ close_code::MESSAGE_TOO_LARGE) => Error::ProtocolViolation {
            side: Side::Remote,
            violation: Violation::Reported { code, reason: "the peer says we sent a message over its limit".into() },
        },
        Ok(close_code::ALPN_MISMATCH) => Error::AlpnMismatch { negotiated: None },
        Ok(close_code::INTEGRITY_FAILURE) => {
            Error::ProtocolViolation { side: Side::Remote, violation: Violation::IntegrityFailures(None) }
        }
        Ok(close_code::RETIRED_EPOCH) => {
            Error::ProtocolViolation { side: Side::Remote, violation: Violation::RetiredEpoch(None) }
        }
        Ok(close_code::RECONNECT) => {
            Error::ConnectionLost { reason: "the peer moved the session to a new connection".into() }
        }
        Ok(close_code::UNKNOWN_SESSION) => {
            Error::ProtocolViolation { side: Side::Remote, violation: Violation::UnknownSession(None) }
        }
        Ok(close_code::PEER_LIMIT) => Error::Refused,
        Ok(close_code::NO_ERROR) => Error::ConnectionLost { reason: format!("closed by the peer: {reason}") },
        _ => Error::ConnectionLost { reason: format!("closed by the peer with code {code}: {reason}") },
    }
}

/// Rebuilds rustls' reason from the alert when our verifier did not see the failure (rustls
/// checks some things itself, before any verifier runs).
fn rustls_error_for(alert: AlertDescription, reason: &str) -> rustls::Error {
    match alert {
        AlertDescription::CertificateRequired => rustls::Error::NoCertificatesPresented,
        _ => rustls::Error::General(reason.to_owned()),
    }
}

impl Error {
    /// Whether this is the peer's policy or TLS stack refusing us (useful for retry decisions:
    /// retrying will not help). [`Error::Refused`] is not: a node refuses connections while it
    /// is overloaded (too many handshakes or connections), and a later attempt may succeed.
    pub fn is_refusal_by_peer(&self) -> bool {
        matches!(self, Error::Tls(TlsError::Remote { .. }) | Error::Unauthorized { side: Side::Remote, .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_close_codes_map_to_kinds() {
        assert!(matches!(
            from_application_close(close_code::UNAUTHORIZED as u64, b"unauthorized"),
            Error::Unauthorized { side: Side::Remote, .. }
        ));
        assert!(matches!(
            from_application_close(close_code::PROTOCOL_VIOLATION as u64, b"x"),
            Error::ProtocolViolation { side: Side::Remote, .. }
        ));
        assert!(matches!(from_application_close(close_code::ALPN_MISMATCH as u64, b""), Error::AlpnMismatch { .. }));
        assert!(matches!(from_application_close(u64::MAX, b""), Error::ConnectionLost { .. }));
    }

    #[test]
    fn load_error_names_the_file() {
        let e = LoadError {
            path: Some("/etc/x/node.key".into()),
            problem: LoadProblem::WrongPemType { expected: "PRIVATE KEY", found: vec!["CERTIFICATE".into()] },
        };
        let s = e.to_string();
        assert!(s.contains("/etc/x/node.key") && s.contains("PRIVATE KEY") && s.contains("CERTIFICATE"), "{s}");
    }
}
