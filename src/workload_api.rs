//! A node's identity from the SPIFFE Workload API (feature `workload-api`): its X.509-SVID
//! and the trust bundles, fetched from a SPIRE agent's socket (or any server of the Workload
//! API) and followed as they rotate.
//!
//! ```no_run
//! # async fn run() -> quicseal::Result<()> {
//! use quicseal::workload_api::WorkloadApi;
//! use quicseal::{Node, NodeConfig};
//!
//! // The agent's socket from SPIFFE_ENDPOINT_SOCKET, such as
//! // unix:///run/spire/agent/public/api.sock.
//! let api = WorkloadApi::connect(None).await?;
//! let (identity, trust) = api.material()?;
//! let node = Node::bind("[::]:4433".parse().unwrap(), NodeConfig::new(identity, trust))?;
//! // New handshakes use each SVID and bundle the agent rotates in; sessions keep running.
//! let _follower = node.follow(&api);
//! # Ok(())
//! # }
//! ```
//!
//! What the node gets: the default X.509-SVID (the first the agent lists) with its chain and
//! key as its [`Identity`], and a [`TrustStore`] with one bundle per trust domain, its own and
//! every federated one ([`TrustStore::add_bundle_der`]): a peer's SVID must chain to the
//! bundle of its own trust domain, and a peer without a SPIFFE ID, or from a trust domain
//! without a bundle, is refused. Dial peers by SPIFFE ID ([`Node::connect`] with
//! `spiffe://...`) and authorize them by it ([`crate::Policy`]).
//!
//! The client is the `spiffe` crate's `X509Source`: it keeps one streaming call open to the
//! agent, reconnects with backoff when the agent restarts, and keeps the last good material
//! meanwhile. CRLs the agent may send are not used (SPIRE sends none; SVIDs are short-lived
//! instead). JWT-SVIDs are not used either.
//!
//! [`Node::connect`]: crate::Node::connect

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::X509Source;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::identity::{Identity, TrustStore};
use crate::reload::{CertWatcher, Reloadable, WatchStatus};

/// How long [`WorkloadApi::connect`] waits for the agent's first answer.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A live connection to a SPIFFE Workload API: the current SVID and bundles, updated in the
/// background as the agent rotates them. Cloning shares the connection.
#[derive(Clone, Debug)]
pub struct WorkloadApi {
    source: X509Source,
}

impl WorkloadApi {
    /// Connects to the Workload API at `endpoint` (`unix:///path/to/socket` or
    /// `tcp://ip:port`), or, with `None`, at the address in the `SPIFFE_ENDPOINT_SOCKET`
    /// environment variable, and waits for its first SVID and bundles, at most
    /// [`DEFAULT_CONNECT_TIMEOUT`].
    ///
    /// Errors ([`Error::WorkloadApi`]): no endpoint given or set, an endpoint that does not
    /// parse, no usable answer in time (no agent at that address, or the agent has no SVID for
    /// this workload), an answer that is refused.
    pub async fn connect(endpoint: Option<&str>) -> Result<WorkloadApi> {
        WorkloadApi::connect_within(endpoint, DEFAULT_CONNECT_TIMEOUT).await
    }

    /// [`WorkloadApi::connect`], waiting at most `timeout` for the first answer.
    pub async fn connect_within(endpoint: Option<&str>, timeout: Duration) -> Result<WorkloadApi> {
        let mut builder = X509Source::builder().initial_sync_timeout(timeout);
        match endpoint {
            Some(endpoint) => builder = builder.endpoint(endpoint),
            None if std::env::var_os(spiffe::workload_api::endpoint::WORKLOAD_API_ENDPOINT_ENV).is_none() => {
                return Err(Error::WorkloadApi(
                    "no endpoint: give one, or set SPIFFE_ENDPOINT_SOCKET (such as \
                     unix:///run/spire/agent/public/api.sock)"
                        .into(),
                ));
            }
            None => {}
        }
        // The source retries a missing socket until the timeout; the outer timeout also
        // bounds a server that accepts and never answers.
        let source = match tokio::time::timeout(timeout + Duration::from_secs(1), builder.build()).await {
            Ok(Ok(source)) => source,
            Ok(Err(e)) => return Err(Error::WorkloadApi(format!("no SVID within {timeout:?}: {e}"))),
            Err(_) => return Err(Error::WorkloadApi(format!("no SVID within {timeout:?}"))),
        };
        let api = WorkloadApi { source };
        // The first answer must make a usable identity, or connecting fails.
        api.material()?;
        Ok(api)
    }

    /// The current SVID as an identity, and a trust store of the current bundles (one per
    /// trust domain). Errors ([`Error::WorkloadApi`]) when the agent withdrew this workload's
    /// SVID, or what it serves cannot be used.
    pub fn material(&self) -> Result<(Identity, TrustStore)> {
        let svid = self.source.svid().map_err(|e| Error::WorkloadApi(format!("no usable SVID: {e}")))?;
        let chain = svid.cert_chain().iter().map(|c| CertificateDer::from(c.as_bytes().to_vec())).collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.private_key().as_bytes().to_vec()));
        let identity = Identity::from_der(chain, key)
            .map_err(|e| Error::WorkloadApi(format!("the SVID for {} cannot be used: {e}", svid.spiffe_id())))?;
        let bundles = self.source.bundle_set().map_err(|e| Error::WorkloadApi(format!("no bundles: {e}")))?;
        let mut trust = TrustStore::new();
        for (domain, bundle) in bundles.iter() {
            let cas = bundle.authorities().iter().map(|c| CertificateDer::from(c.as_bytes().to_vec()));
            trust.add_bundle_der(domain.as_str(), cas).map_err(|e| {
                Error::WorkloadApi(format!("the bundle of trust domain {} cannot be used: {e}", domain.as_str()))
            })?;
        }
        Ok((identity, trust))
    }

    /// The SPIFFE ID of the current SVID.
    pub fn spiffe_id(&self) -> Result<String> {
        let svid = self.source.svid().map_err(|e| Error::WorkloadApi(format!("no usable SVID: {e}")))?;
        Ok(svid.spiffe_id().to_string())
    }

    /// Closes the connection to the agent (for every clone); followers stop.
    pub async fn close(&self) {
        self.source.shutdown().await;
    }
}

/// Reloads what `target` returns with each new SVID or bundle `api` receives, until `target`
/// returns `None` or the source closes (see [`Node::follow`](crate::Node::follow)).
pub(crate) fn follow<T: Reloadable>(api: &WorkloadApi, target: impl Fn() -> Option<T> + Send + 'static) -> CertWatcher {
    let status = Arc::new(Mutex::new(WatchStatus::default()));
    let api = api.clone();
    let task = tokio::spawn({
        let status = status.clone();
        async move {
            let mut updates = api.source.updated();
            // Updates between `connect` and now (the node was built from an earlier answer):
            // the first pass reloads at once.
            let mut seen = None;
            loop {
                let now = updates.last();
                if seen != Some(now) {
                    seen = Some(now);
                    let Some(node) = target() else { return };
                    let result = api.material().and_then(|(identity, trust)| node.reload(identity, trust));
                    let mut st = status.lock().unwrap_or_else(|e| e.into_inner());
                    st.checks += 1;
                    match result {
                        Ok(()) => {
                            st.reloads += 1;
                            st.last_error = None;
                            info!(revision = now, "Workload API: SVID and bundles reloaded");
                        }
                        Err(e) => {
                            st.failures += 1;
                            warn!(error = %e, "Workload API: new material cannot be used: keeping the last good one");
                            st.last_error = Some(e.to_string());
                        }
                    }
                }
                if updates.changed().await.is_err() {
                    let mut st = status.lock().unwrap_or_else(|e| e.into_inner());
                    st.last_error = Some("the Workload API source was closed".into());
                    return;
                }
            }
        }
    });
    CertWatcher::new(task, status)
}
