//! # quicseal
//!
//! Secure, authenticated messaging between the nodes of a distributed system, over QUIC.
//!
//! ## What it does
//!
//! - **Mutual TLS 1.3 over QUIC** (quinn + rustls on ring). Both peers present certificates from
//!   the operator's own CA ([`TrustStore`]: CAs, CRLs, a deny-list of keys). The dialler checks
//!   the peer's name; the acceptor requires a client certificate, always. No 0-RTT, no session
//!   resumption, ALPN `quicseal/1`.
//! - **A typed peer identity** ([`PeerIdentity`]: DNS/IP/URI SANs, SPIFFE ID, CN, key
//!   fingerprint, expiry) on every session and message, and an **authorization [`Policy`]**
//!   evaluated on both sides after the handshake.
//! - **Ordered, reliable channels** carrying typed `serde` messages (postcard) or raw bytes,
//!   each delivered **exactly once**, with end-to-end receipts ([`Session::delivered`] waits until
//!   the peer's application took them), through connection loss: sessions reconnect and resume
//!   ([`SessionEvent`]); and **datagrams** ([`Session::send_datagram`]) that may be lost.
//! - **Sealed messages**: AES-256-GCM under keys exported from the TLS session, per direction,
//!   binding kind, channel, epoch, sequence number and send time; **replay windows**
//!   (RFC 6479), a **freshness** horizon and per-session **epochs** ([`proto::seal`]). Every
//!   refusal is counted ([`Stats`]).
//! - **Request/response RPC** ([`Router`], [`Session::request`], [`RpcClient`]): typed or raw
//!   calls with deadlines carried as relative budgets, cancellation when the caller's future is
//!   dropped, typed remote errors ([`RemoteError`]), per-session and per-node concurrency limits,
//!   and at-most-once execution across retries and reconnects ([`Router`] explains the cache
//!   and its horizon).
//! - **Limits on everything a peer can make us spend** ([`Limits`]), with safe defaults. Input
//!   from a peer never panics: it is a typed [`Error`] and a closed connection.
//! - **PKI helpers** ([`pki`]) to create a CA, node certificates and CRLs, and **hot reload**:
//!   [`Node::reload`] and a file watcher ([`Node::watch`]) swap identity, CAs and CRLs without a
//!   restart; [`Node::expiry`] says how many days the certificates have left.
//! - **SPIFFE identities**: dial a peer by its SPIFFE ID ([`PeerName`]), one trust bundle per
//!   trust domain ([`TrustStore::add_bundle_file`]), and, with the cargo feature
//!   `workload-api`, the node's SVID and bundles from a SPIRE agent's Workload API, followed as
//!   they rotate (`quicseal::workload_api`).
//! - **Metrics**: [`Node::record_metrics`] and [`Node::export_metrics`] publish the node's
//!   counters through the [`metrics`](https://docs.rs/metrics) facade, for whatever exporter the
//!   application installs (`quicseal listen --metrics ADDR` serves them to Prometheus).
//!
//! ## What it does not do
//!
//! A session that cannot be resumed within
//! `Limits::resume_timeout` ends, and what was not acknowledged by then is lost (the sender sees
//! it in [`Session::delivered`]). quicseal is
//! not a general-purpose TLS or HTTP library, and it does not talk to peers outside quicseal.
//!
//! ## Example
//!
//! ```
//! use std::time::Duration;
//! use quicseal::pki::{Ca, KeyType, NodeCert};
//! use quicseal::{Identity, Node, NodeConfig, TrustStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> quicseal::Result<()> {
//! // A throwaway CA and two nodes (operators use `quicseal cert` or their own CA).
//! let ca = Ca::new("example CA", KeyType::EcdsaP256, Duration::from_secs(3600))?;
//! let mut trust = TrustStore::new();
//! trust.add_ca_pem(ca.cert_pem().as_bytes())?;
//! let make = |name: &str| -> quicseal::Result<Identity> {
//!     let issued = ca.issue(&NodeCert::new(name).dns(name))?;
//!     Identity::from_pem(issued.chain_pem.as_bytes(), issued.key_pem.as_bytes())
//! };
//! let alice = Node::bind("127.0.0.1:0".parse().unwrap(), NodeConfig::new(make("alice")?, trust.clone()))?;
//! let bob = Node::bind("127.0.0.1:0".parse().unwrap(), NodeConfig::new(make("bob")?, trust))?;
//!
//! let (to_bob, at_bob) = tokio::join!(alice.connect(bob.local_addr()?, "bob"), bob.accept());
//! let (to_bob, at_bob) = (to_bob?, at_bob?);
//! to_bob.send(0, &("hello", 1u32)).await?;
//! let msg = at_bob.recv().await?;
//! assert_eq!(msg.peer().dns_names, ["alice"]);
//! assert_eq!(msg.decode::<(String, u32)>()?, ("hello".to_string(), 1));
//! to_bob.delivered(0).await?; // bob's application has it
//! # Ok(()) }
//! ```

#![deny(rustdoc::broken_intra_doc_links)]

mod client;
mod config;
mod durable;
mod error;
mod export;
mod identity;
mod node;
mod peer_name;
mod policy;
mod reload;
mod rpc;
mod session;
mod stats;
mod tls;
mod wait;

#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
pub mod netsim;
pub mod pki;
pub mod proto;
pub mod store;
#[cfg(feature = "workload-api")]
pub mod workload_api;

pub use client::RpcClient;
pub use config::{Limits, NodeConfig};
pub use error::{
    ApplicationError, Error, Limited, LoadError, LoadProblem, RemoteError, Result, Side, Timed, TlsError, Violation,
    close_code,
};
pub use export::MetricsExporter;
pub use identity::{Fingerprint, Identity, PeerIdentity, TrustStore, load_certificates};
pub use node::Node;
pub use peer_name::{MAX_SPIFFE_ID_LEN, PeerName, SpiffeId};
pub use policy::Policy;
pub use proto::rpc::{CacheConfig, CallId};
pub use reload::{CertExpiry, CertFiles, CertWatcher, EXPIRY_WARNING, Expiry, WatchStatus};
pub use rpc::{
    Call, CallOptions, CancelReason, FIRST_RESERVED_CHANNEL, REQUEST_CHANNEL, RESPONSE_CHANNEL, Router, RouterConfig,
};
pub use session::{Message, Session, SessionEvent};
pub use stats::Stats;
pub use tls::{ALPN, DeniedKey, MissingExtendedKeyUsage, MixedTrustDomains, NotTheSvid};

/// Re-exported so callers can match [`TlsError`] reasons without depending on rustls directly.
pub use rustls;

/// The README's Rust blocks, compiled (and the complete ones run) by `cargo test` as doc-tests,
/// so the README cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
