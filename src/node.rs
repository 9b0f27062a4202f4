//! [`Node`]: a quinn endpoint that both accepts and dials mutually authenticated sessions.
//!
//! Establishing a session, on either side:
//! 1. QUIC + TLS 1.3 handshake; both certificates are verified against the trust store (CAs,
//!    CRLs, deny-list), and the dialler also checks the peer's name.
//! 2. ALPN must be `quicseal/1`.
//! 3. The authorization [`Policy`](crate::Policy) decides on the peer's [`PeerIdentity`].
//! 4. Hello exchange on the control stream: the dialler sends HELLO, the acceptor answers once
//!    it has accepted the dialler. In TLS 1.3 the dialler finishes its handshake before the
//!    acceptor has judged the dialler's certificate, so only the acceptor's HELLO proves the
//!    dialler was accepted: [`Node::connect`] returns after it. A new session's first message
//!    may follow the dialler's HELLO at once, before the answer
//!    ([`Node::connect_and_send_bytes`]): it is read only by an acceptor that accepted us.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use quinn::crypto::rustls::HandshakeData;
use quinn::{Connection, Endpoint, RecvStream, VarInt};
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::{Limits, NodeConfig, StoreChoice};
use crate::durable::Durable;
use crate::error::{Error, Limited, Result, Side, Timed, Violation, close_code, from_connection_error};
use crate::identity::{Fingerprint, Identity, PeerIdentity, TrustStore};
use crate::peer_name::PeerName;
use crate::policy::Policy;
use crate::proto::epochs::EpochBook;
use crate::proto::hello::{self, Admission, HelloRefusal, PeerHello};
use crate::proto::reliable::{InboxConfig, OutboxConfig};
use crate::proto::seal::{self, EXPORTER_LABEL, KEY_MATERIAL_LEN, OpenConfig, OpeningKey, SealingKey};
use crate::proto::session::{SessionConfig, SessionCore};
use crate::proto::wire::{self, FRAME_HEADER_LEN, Frame, FrameHeader, STREAM_HEADER_LEN, StreamKind, frame_type};
use crate::rpc::RpcServer;
use crate::session::{
    EndHook, FirstLink, LinkParts, Outlet, Redial, Resumable, ResumePolicy, Session, SessionParams, send_first,
};
use crate::stats::{Counter, Counters, Stats, Tally};
use crate::store::{DurableStore, Store, Stored};
use crate::tls::{ALPN, Lease, TlsContext, take_captured};

/// A quicseal node bound to one UDP address: it accepts sessions and dials them.
///
/// Cheap to clone. Dropping the last clone closes the endpoint and with it every session.
///
/// ```no_run
/// # async fn run() -> quicseal::Result<()> {
/// use quicseal::{Identity, Node, NodeConfig, TrustStore};
/// let identity = Identity::from_pem_files("certs/node-a.crt", "certs/node-a.key")?;
/// let trust = TrustStore::from_ca_file("certs/ca.crt")?;
/// let node = Node::bind("127.0.0.1:0".parse().unwrap(), NodeConfig::new(identity, trust))?;
/// let session = node.connect("127.0.0.1:4433".parse().unwrap(), "node-b").await?;
/// session.send(0, &("hello", 42u32)).await?;
/// session.delivered(0).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

struct NodeShared {
    endpoint: Endpoint,
    /// The TLS material new handshakes use; swapped by [`Node::reload`].
    tls: std::sync::RwLock<Arc<TlsContext>>,
    /// The identity and trust store behind `tls`.
    material: std::sync::RwLock<(Identity, TrustStore)>,
    base_server: quinn::ServerConfig,
    transport: Arc<quinn::TransportConfig>,
    policy: Policy,
    limits: Limits,
    manual_ack: bool,
    counters: Arc<Counters>,
    retired: Arc<std::sync::Mutex<EpochBook<Fingerprint>>>,
    /// RPC handlers and their shared state (cache, node-wide concurrency).
    rpc: Arc<RpcServer>,
    /// Accepted sessions a reconnecting peer may resume, by (peer's names digest, peer epoch):
    /// by what the certificate names rather than its key, so a peer that renewed its
    /// certificate (new key, same names, same CA) resumes its sessions.
    resumable: Arc<std::sync::Mutex<HashMap<(Fingerprint, u64), Resumable>>>,
    /// Incoming handshakes in progress, in all and per IP address.
    handshakes: Arc<std::sync::Mutex<Handshakes>>,
    /// Incoming connections open (counted until each one closes).
    incoming_open: Arc<AtomicUsize>,
    /// Incoming connections open per peer (by names digest).
    per_peer: Arc<std::sync::Mutex<HashMap<Fingerprint, usize>>>,
    /// Received-but-unread bytes over all sessions.
    unread: Arc<crate::session::UnreadBudget>,
    /// Durable channels, when the node keeps a store.
    durable: Option<Arc<Durable<Outlet>>>,
}

/// Incoming handshakes in progress.
#[derive(Default)]
struct Handshakes {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One incoming handshake in progress: counted until dropped.
struct HandshakeSlot {
    handshakes: Arc<std::sync::Mutex<Handshakes>>,
    address: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut h = self.handshakes.lock().unwrap_or_else(|e| e.into_inner());
        h.total -= 1;
        if let std::collections::hash_map::Entry::Occupied(mut e) = h.by_address.entry(self.address) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

impl NodeShared {
    fn tls(&self) -> Arc<TlsContext> {
        self.tls.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Epochs remembered per peer in the retired-epoch book.
const RETIRED_PER_PEER: usize = 16;

pub(crate) struct NodeInner {
    shared: Arc<NodeShared>,
    accepted: tokio::sync::Mutex<mpsc::Receiver<Result<Session>>>,
    accept_task: JoinHandle<()>,
}

impl Drop for NodeInner {
    fn drop(&mut self) {
        self.accept_task.abort();
        if let Some(d) = &self.shared.durable {
            d.close();
        }
        self.shared.endpoint.close(VarInt::from_u32(close_code::NO_ERROR), b"node closed");
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("local_addr", &self.local_addr().ok()).finish_non_exhaustive()
    }
}

impl Node {
    /// Binds a node to a UDP address (port 0 picks a free port). Must be called inside a tokio
    /// runtime.
    pub fn bind(addr: SocketAddr, config: NodeConfig) -> Result<Node> {
        config.limits.validate()?;
        if let Some(router) = &config.rpc {
            RpcServer::validate(router)?;
        }
        let tls = TlsContext::new(&config.identity, &config.trust)?;
        crate::reload::Expiry::of(&config.identity, &config.trust).log_warnings();
        let transport = config.transport();
        let (crypto, _) = tls.server_config()?;
        let mut base_server = quinn::ServerConfig::with_crypto(crypto);
        base_server.transport_config(transport.clone());
        // Connection attempts are admitted one by one in the accept loop (Retry, handshake and
        // connection budgets, per-connection verifier); quinn's own cap on attempts waiting for
        // that loop is the handshake budget.
        base_server.max_incoming(config.limits.max_handshakes);
        // Early packets buffered per connection attempt before it is accepted (a handshake
        // needs a few KiB), and in total.
        base_server.incoming_buffer_size(64 * 1024);
        base_server.incoming_buffer_size_total(16 << 20);
        // Peers are nodes with fixed addresses; a migrating peer is a reconnecting peer.
        base_server.migration(false);
        let durable = match &config.store {
            Some(StoreChoice::Dir(dir, limits)) => {
                Some(Durable::new(Arc::new(Store::open_with(dir, *limits).map_err(Error::Store)?))?)
            }
            Some(StoreChoice::Backend(backend)) => Some(Durable::new(backend.clone())?),
            None => None,
        };
        let reset_secret = durable.as_ref().map(|d| d.store().secret());
        let socket = bind_udp(addr, config.limits.udp_socket_buffer)?;
        let endpoint = Endpoint::new(
            endpoint_config(reset_secret),
            Some(base_server.clone()),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let unread = Arc::new(crate::session::UnreadBudget::new(config.limits.node_receive_buffer));
        let shared = Arc::new(NodeShared {
            endpoint,
            tls: std::sync::RwLock::new(Arc::new(tls)),
            material: std::sync::RwLock::new((config.identity.clone(), config.trust.clone())),
            base_server,
            transport,
            retired: Arc::new(std::sync::Mutex::new(EpochBook::new(config.limits.retired_epochs, RETIRED_PER_PEER))),
            policy: config.policy,
            limits: config.limits,
            manual_ack: config.manual_ack,
            rpc: RpcServer::new(config.rpc),
            counters: Arc::default(),
            resumable: Arc::default(),
            handshakes: Arc::default(),
            incoming_open: Arc::default(),
            per_peer: Arc::default(),
            unread,
            durable,
        });
        let (tx, rx) = mpsc::channel(shared.limits.accept_queue);
        let accept_task = tokio::spawn(accept_loop(shared.clone(), tx));
        Ok(Node { inner: Arc::new(NodeInner { shared, accepted: tokio::sync::Mutex::new(rx), accept_task }) })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.inner.shared.endpoint.local_addr()?)
    }

    /// Totals over every session of this node, past and present.
    pub fn stats(&self) -> Stats {
        self.inner.shared.counters.snapshot()
    }

    /// Bytes received by all this node's sessions and not yet taken by the application (bounded
    /// by `Limits::node_receive_buffer`, plus one message per session).
    pub fn buffered_bytes(&self) -> usize {
        self.inner.shared.unread.used()
    }

    /// Open QUIC connections, incoming and dialled.
    pub(crate) fn open_connections(&self) -> usize {
        self.inner.shared.endpoint.open_connections()
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.inner.shared.limits
    }

    /// Dials `addr`, expecting the peer's certificate to prove `server_name`: a DNS name or an
    /// IP address (a SAN of the certificate), or a SPIFFE ID (`spiffe://...`: the certificate
    /// must be an X.509-SVID for exactly that ID; see [`PeerName`](crate::PeerName)). Returns
    /// once the peer has accepted us (see the module docs).
    ///
    /// Errors: [`Error::InvalidInput`] for a name that is none of these.
    pub async fn connect(&self, addr: SocketAddr, server_name: &str) -> Result<Session> {
        connect(&self.inner.shared, addr, server_name, None).await.map(|(session, _)| session)
    }

    /// [`Node::connect`], and sends a first typed message on `channel` (postcard encoding); see
    /// [`Node::connect_and_send_bytes`].
    pub async fn connect_and_send<T: Serialize + ?Sized>(
        &self,
        addr: SocketAddr,
        server_name: &str,
        channel: u16,
        message: &T,
    ) -> Result<(Session, u64)> {
        let bytes = postcard::to_allocvec(message)?;
        self.connect_and_send_bytes(addr, server_name, channel, bytes).await
    }

    /// [`Node::connect`], and sends `payload` as the session's first message on `channel`,
    /// saving a round trip: a payload of at most 1,024 bytes leaves right behind this node's
    /// HELLO, before the peer's HELLO comes back (PROTOCOL.md section 2, "The early message"),
    /// so it reaches the peer's application one round trip sooner than with `connect` then
    /// [`Session::send_bytes`]. A larger payload is sent as soon as the session is
    /// established, like `send_bytes`. Returns the session and the message's sequence number
    /// (1), once the peer has accepted us, as `connect` does.
    ///
    /// The message goes only to a peer whose certificate and authorization this node checked,
    /// sealed under the new connection's keys: it is not TLS early data (0-RTT) and cannot be
    /// replayed. If the call fails after the handshake (the peer refused the session, or the
    /// connection was lost), the message was not delivered, unless the peer had accepted the
    /// session and the connection was lost before its answer arrived: as for any message
    /// whose delivery was not confirmed, it may then have been delivered once.
    ///
    /// Errors: those of `connect`, and those of `send_bytes` for the message
    /// ([`Error::ReservedChannel`], [`Error::MessageTooLarge`] beyond what both sides accept).
    pub async fn connect_and_send_bytes(
        &self,
        addr: SocketAddr,
        server_name: &str,
        channel: u16,
        payload: impl Into<Bytes>,
    ) -> Result<(Session, u64)> {
        let payload = payload.into();
        crate::session::reserved(channel)?;
        if payload.len() > PeerHello::EARLY.max_message_size.min(self.inner.shared.limits.max_message_size) {
            let session = self.connect(addr, server_name).await?;
            let seq = session.send_bytes(channel, payload).await?;
            return Ok((session, seq));
        }
        match connect(&self.inner.shared, addr, server_name, Some((channel, payload))).await? {
            (session, Some(seq)) => Ok((session, seq)),
            (_, None) => Err(Error::Internal("the first message was not sent".into())),
        }
    }

    /// The next session a peer opened with us.
    ///
    /// A connection that fails authentication or authorization is returned here as its
    /// `Err` (so the operator sees it); the node keeps serving, so call `accept` again.
    /// [`Error::Closed`] means the node was closed.
    pub async fn accept(&self) -> Result<Session> {
        self.inner.accepted.lock().await.recv().await.unwrap_or(Err(Error::Closed))
    }

    /// Accepts sessions until the node is closed and keeps each one open until it ends, for a
    /// node whose application only serves RPC ([`NodeConfig::rpc`](crate::NodeConfig::rpc)):
    /// sessions end when the last handle is dropped, so someone has to hold them. Refused
    /// connections are logged and skipped.
    pub async fn serve(&self) {
        loop {
            match self.accept().await {
                Ok(session) => {
                    tokio::spawn(async move {
                        session.closed().await;
                    });
                }
                Err(Error::Closed) => return,
                Err(e) => tracing::debug!(error = %e, "serve: connection refused"),
            }
        }
    }

    /// Replaces this node's identity and trust store (CAs, CRLs) without a restart, and adds
    /// the new store's denied keys to the node's deny-list.
    ///
    /// New handshakes (new sessions, and reconnections of existing ones) use the new material;
    /// established connections keep running. Material that does not make a usable TLS
    /// configuration (no CA, unusable CA certificate...) is refused with an error and the node
    /// keeps what it had, and so is a trust store whose CRL for a CA it still trusts is older
    /// than the one in force, or missing (revocation never goes back). Certificates and CAs
    /// that expire within 30 days are logged.
    ///
    /// One rule for the deny-list, whoever reloads (this method, [`Node::reload_trust`] or the
    /// certificate watcher): a reload never lifts a denial; only [`Node::undeny`] does.
    pub fn reload(&self, identity: Identity, mut trust: TrustStore) -> Result<()> {
        // Revocation never goes back (a CRL older than the one in force would un-revoke), and
        // neither does the deny-list.
        let current = self.trust();
        trust.check_no_revocation_rollback(&current)?;
        for fp in current.denied_keys() {
            trust.deny(fp);
        }
        self.install(identity, trust)
    }

    /// Lifts the denial of a key; returns whether it was denied. New handshakes accept it again
    /// (if the trust store and the policy do).
    pub fn undeny(&self, fingerprint: Fingerprint) -> Result<bool> {
        let (identity, mut trust) = self.inner.shared.material.read().unwrap_or_else(|e| e.into_inner()).clone();
        if !trust.denied.remove(&fingerprint) {
            return Ok(false);
        }
        self.install(identity, trust)?;
        info!(%fingerprint, "key removed from the deny-list");
        Ok(true)
    }

    /// Puts new material in place for new handshakes.
    fn install(&self, identity: Identity, trust: TrustStore) -> Result<()> {
        let shared = &self.inner.shared;
        let context = TlsContext::new(&identity, &trust)?;
        let expiry = crate::reload::Expiry::of(&identity, &trust);
        *shared.tls.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(context);
        *shared.material.write().unwrap_or_else(|e| e.into_inner()) = (identity, trust);
        info!(fingerprint = %expiry.certificate.fingerprint, "TLS identity and trust store reloaded");
        expiry.log_warnings();
        Ok(())
    }

    /// Replaces only the trust store (a new CRL, another CA, a longer deny-list); see
    /// [`Node::reload`].
    pub fn reload_trust(&self, trust: TrustStore) -> Result<()> {
        self.reload(self.identity(), trust)
    }

    /// The identity new handshakes present.
    pub fn identity(&self) -> Identity {
        self.inner.shared.material.read().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    /// The trust store new handshakes use.
    pub fn trust(&self) -> TrustStore {
        self.inner.shared.material.read().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    /// When this node's certificate and its trusted CAs expire, with days left.
    pub fn expiry(&self) -> crate::reload::Expiry {
        let (identity, trust) = &*self.inner.shared.material.read().unwrap_or_else(|e| e.into_inner());
        crate::reload::Expiry::of(identity, trust)
    }

    /// Watches the files this node's identity and trust come from, and reloads the node
    /// ([`Node::reload`](crate::Node::reload)) when they change: new handshakes use the new
    /// material, established sessions keep running. Changed files that cannot be used
    /// (missing, half-written, a key that does not match its certificate) are reported in
    /// [`CertWatcher::status`](crate::CertWatcher::status) and logged, and the node keeps its last good material. The
    /// node's deny-list is kept across reloads. Expiry within 30 days is logged once a day.
    ///
    /// The files as they are when the watcher starts count as loaded already. Must be called
    /// inside a tokio runtime; the watcher does not keep the node open.
    pub fn watch(&self, files: crate::reload::CertFiles) -> crate::reload::CertWatcher {
        let node = self.downgrade();
        crate::reload::watch(files, move || Node::upgrade(&node))
    }

    /// Follows the SVID and trust bundles a SPIFFE Workload API serves (feature
    /// `workload-api`): each time the agent rotates them, the node reloads
    /// ([`Node::reload`]) with [`WorkloadApi::material`](crate::workload_api::WorkloadApi::material).
    /// New handshakes use the new material, established sessions keep running, the deny-list
    /// is kept. Material that cannot be used is reported in
    /// [`CertWatcher::status`](crate::CertWatcher::status) and logged, and the node keeps its
    /// last good material. The first reload happens at once (the agent may have rotated since
    /// the node was built). Dropping the returned watcher stops following; it does not keep
    /// the node open. Must be called inside a tokio runtime.
    #[cfg(feature = "workload-api")]
    pub fn follow(&self, api: &crate::workload_api::WorkloadApi) -> crate::reload::CertWatcher {
        let node = self.downgrade();
        crate::workload_api::follow(api, move || Node::upgrade(&node))
    }

    /// A handle that does not keep the node open (for background tasks).
    pub(crate) fn downgrade(&self) -> std::sync::Weak<NodeInner> {
        Arc::downgrade(&self.inner)
    }

    pub(crate) fn upgrade(weak: &std::sync::Weak<NodeInner>) -> Option<Node> {
        weak.upgrade().map(|inner| Node { inner })
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        if let Some(d) = &self.inner.shared.durable {
            d.close();
        }
        self.inner.shared.endpoint.close(VarInt::from_u32(close_code::NO_ERROR), b"node closed");
    }

    /// The node's store when it is a [`Store`] on disk ([`NodeConfig::store`], or a `Store`
    /// given to [`NodeConfig::store_backend`]): for [`Store::consume_with`], [`Store::stats`]
    /// and [`Store::inspect`]. `None` with another backend, or none.
    pub fn store(&self) -> Option<&Store> {
        self.durable_store()?.as_any().downcast_ref()
    }

    /// The node's durable store, whatever its backend, if it keeps one.
    pub fn durable_store(&self) -> Option<&Arc<dyn DurableStore>> {
        self.inner.shared.durable.as_ref().map(|d| d.store())
    }

    /// The next durable message from any peer (PROTOCOL.md section 10), oldest first; waits for
    /// one. Each stream's messages come in the order they were sent. A message comes once per
    /// process: until it is consumed ([`Node::consume`], or [`Store::consume_with`] together
    /// with the application's own writes), it is still in the store, and a restarted process
    /// gets it again. `peer` in the message is the sender certificate's names digest
    /// ([`PeerIdentity::names_digest`](crate::PeerIdentity)), which survives renewal.
    ///
    /// Errors: [`Error::Config`] if the node keeps no store, [`Error::Closed`] once it is closed.
    pub async fn recv_durable(&self) -> Result<Stored> {
        match &self.inner.shared.durable {
            Some(d) => d.recv().await,
            None => Err(crate::durable::no_store()),
        }
    }

    /// The application is done with a durable message: it is removed from the store (durably).
    pub async fn consume(&self, message: &Stored) -> Result<()> {
        match self.durable_store() {
            Some(store) => store.consume(message).await.map_err(Error::Store),
            None => Err(crate::durable::no_store()),
        }
    }

    /// Waits until every connection is closed and the peers were told.
    pub async fn wait_idle(&self) {
        self.inner.shared.endpoint.wait_idle().await;
    }
}

async fn accept_loop(shared: Arc<NodeShared>, tx: mpsc::Sender<Result<Session>>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let slot = match admit(&shared, incoming.remote_address(), incoming.remote_address_validated()) {
            Admit::Refuse => {
                shared.counters.bump(Counter::handshakes_refused);
                incoming.refuse();
                continue;
            }
            Admit::Retry => {
                // Stateless: the peer must echo the token from its address before it costs us
                // anything (quinn's clients do so on their own).
                if incoming.may_retry() && incoming.retry().is_ok() {
                    shared.counters.bump(Counter::retries_sent);
                }
                continue;
            }
            Admit::Handshake(slot) => slot,
        };
        let shared = shared.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let result = accept_one(&shared, incoming).await;
            drop(slot);
            match result {
                Ok(Some(session)) => {
                    info!(peer = %session.peer(), %remote, "session established (accepted)");
                    let _ = tx.send(Ok(session)).await;
                }
                Ok(None) => info!(%remote, "session resumed on a new connection"),
                // Failures are reported when there is room; a flood of them must not queue up.
                Err(e) => {
                    warn!(%remote, error = %e, "incoming connection refused");
                    let _ = tx.try_send(Err(e));
                }
            }
        });
    }
}

/// What to do with a new incoming connection attempt.
enum Admit {
    /// Refuse it (a budget is spent).
    Refuse,
    /// Validate the peer's address with a QUIC Retry first.
    Retry,
    /// Handshake, counted in this slot.
    Handshake(HandshakeSlot),
}

/// Decides on a connection attempt from `remote`: the connection and
/// handshake budgets, the per-address budget, and a Retry for an unvalidated address while
/// handshakes pile up (an attacker flooding ClientHellos from addresses it does not receive at
/// then holds no state at all).
fn admit(shared: &NodeShared, remote: SocketAddr, validated: bool) -> Admit {
    let limits = &shared.limits;
    if shared.incoming_open.load(Ordering::SeqCst) >= limits.max_connections {
        warn!(%remote, "refusing connection: incoming connection limit reached");
        return Admit::Refuse;
    }
    let mut h = shared.handshakes.lock().unwrap_or_else(|e| e.into_inner());
    if !validated && h.total >= limits.retry_above {
        return Admit::Retry;
    }
    let from_address = h.by_address.get(&remote.ip()).copied().unwrap_or(0);
    if h.total >= limits.max_handshakes || from_address >= limits.max_handshakes_per_address {
        debug!(%remote, in_progress = h.total, from_address, "refusing connection: too many handshakes in progress");
        return Admit::Refuse;
    }
    h.total += 1;
    *h.by_address.entry(remote.ip()).or_insert(0) += 1;
    Admit::Handshake(HandshakeSlot { handshakes: shared.handshakes.clone(), address: remote.ip() })
}

/// Accepts one connection: a new session (`Some`), or a resumed one (`None`).
async fn accept_one(shared: &Arc<NodeShared>, incoming: quinn::Incoming) -> Result<Option<Session>> {
    let lease = shared.tls().server_lease()?;
    let mut cfg = shared.base_server.clone();
    cfg.crypto = lease.config.clone();
    let connecting = incoming.accept_with(Arc::new(cfg)).map_err(|e| from_connection_error(e, None))?;
    let deadline = tokio::time::Instant::now() + shared.limits.handshake_timeout;
    let conn = match tokio::time::timeout_at(deadline, connecting).await {
        Ok(conn) => tls_finished(conn, lease)?,
        Err(_) => return Err(Error::Timeout { what: Timed::Handshake }),
    };
    // Counted as an open incoming connection until it closes, and once the handshake knows
    // who the peer is, as one of that peer's.
    shared.incoming_open.fetch_add(1, Ordering::SeqCst);
    let peer_slot = Arc::new(std::sync::OnceLock::new());
    let (open, per_peer, slot, watched) =
        (shared.incoming_open.clone(), shared.per_peer.clone(), peer_slot.clone(), conn.clone());
    tokio::spawn(async move {
        watched.closed().await;
        open.fetch_sub(1, Ordering::SeqCst);
        if let Some(peer) = slot.get() {
            let mut per_peer = per_peer.lock().unwrap_or_else(|e| e.into_inner());
            if let std::collections::hash_map::Entry::Occupied(mut e) = per_peer.entry(*peer) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    });
    let accepting = HandshakeRole::Acceptor(peer_slot);
    let result = tokio::time::timeout_at(deadline, handshake(shared, conn.clone(), accepting, None))
        .await
        .unwrap_or_else(|_| {
            conn.close(VarInt::from_u32(close_code::HELLO_TIMEOUT), b"hello timeout");
            Err(Error::Timeout { what: Timed::Handshake })
        });
    if result.is_err() {
        // Every refusal closed the connection with its code already; this only makes sure no
        // half-open connection lingers (the watcher above holds a handle to it).
        conn.close(VarInt::from_u32(close_code::NO_ERROR), b"");
    }
    match result? {
        Outcome::Resumed => Ok(None),
        Outcome::New(h) => Ok(Some(start_session(shared, *h, None, None))),
        Outcome::Redialled(_) => Err(Error::Internal("an accepted connection cannot be a redial".into())),
    }
}

/// The endpoint's configuration: our connection IDs, and with a store, stateless resets keyed
/// by the store's secret, so that a restarted process's resets are recognised by peers of the
/// process before (PROTOCOL.md section 10): they learn of the restart in one round trip
/// instead of after their idle timeout. Without a store, quinn draws a random key per process.
fn endpoint_config(reset_secret: Option<[u8; 32]>) -> quinn::EndpointConfig {
    let mut config = match reset_secret {
        Some(secret) => {
            let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
            let key = ring::hmac::sign(&derive, b"quicseal stateless reset key v1");
            quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_ref())))
        }
        None => quinn::EndpointConfig::default(),
    };
    config.cid_generator(cid_generator);
    config
}

fn cid_generator() -> Box<dyn quinn::ConnectionIdGenerator> {
    Box::new(RandomCids { made: 0 })
}

/// Connection IDs of 64 random bits.
///
/// quinn's default generator draws 24 random bits per ID (the rest is a keyed hash that lets it
/// drop non-QUIC packets cheaply), and the ID it puts in a Retry is not checked against the IDs
/// of live connections. With thousands of connections, each holding several IDs, a Retry's ID
/// then often equals a live connection's: the dialler's next Initial, sent to that ID, reaches
/// the wrong connection, which drops it, and the dial hangs until its handshake timeout. The
/// W7 benchmark lost about one dial in a thousand that way once more than `retry_above`
/// handshakes were in progress. With 64 bits, such a collision is out of reach.
///
/// Each ID is also XORed with a count of the IDs this generator made (one generator serves an
/// endpoint): that keeps the IDs uniformly random, and distinct even if the system's generator
/// ever failed (ring's does not on the platforms it supports, but a failure must not turn every
/// ID into the same one).
struct RandomCids {
    made: u64,
}

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; RANDOM_CID_LEN];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
        for (byte, count) in id.iter_mut().zip(self.made.to_be_bytes()) {
            *byte ^= count;
        }
        self.made = self.made.wrapping_add(1);
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        RANDOM_CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// Bytes of a connection ID made by [`RandomCids`].
const RANDOM_CID_LEN: usize = 8;

/// Binds the node's UDP socket with kernel buffers of `buffer` bytes each way (0: the system's
/// default). A kernel that caps them lower is not an error: the node works with what it got,
/// and says so at debug level.
fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    if buffer > 0 {
        let s = socket2::SockRef::from(&socket);
        let _ = s.set_recv_buffer_size(buffer);
        let _ = s.set_send_buffer_size(buffer);
        // Linux reports twice what it grants (its bookkeeping overhead).
        let (recv, send) = (s.recv_buffer_size().unwrap_or(0) / 2, s.send_buffer_size().unwrap_or(0) / 2);
        if recv < buffer || send < buffer {
            debug!(
                wanted = buffer,
                recv, send, "the kernel capped the UDP socket buffers (net.core.rmem_max, wmem_max)"
            );
        }
    }
    Ok(socket)
}

/// Dials `addr` and runs the quicseal handshake; `resume` is the (peer names digest, peer epoch) of a
/// session to resume, `first` a new session's first message, sent right behind our HELLO.
async fn dial(
    shared: &Arc<NodeShared>,
    addr: SocketAddr,
    server_name: &str,
    epoch: u64,
    resume: Option<(Fingerprint, u64)>,
    first: Option<(u16, Bytes)>,
) -> Result<Outcome> {
    // Our own dials count apart from incoming connections, which never block them.
    let dialled = shared.endpoint.open_connections().saturating_sub(shared.incoming_open.load(Ordering::SeqCst));
    if dialled >= shared.limits.max_connections {
        return Err(Error::Limit { what: Limited::ConnectionsPerNode, limit: shared.limits.max_connections as u64 });
    }
    let name = PeerName::parse(server_name)?;
    let lease = shared.tls().client_lease(name.spiffe_id().cloned())?;
    let mut cfg = quinn::ClientConfig::new(lease.config.clone());
    cfg.transport_config(shared.transport.clone());
    let connecting = shared.endpoint.connect_with(cfg, addr, &name.tls_name()).map_err(|e| match e {
        quinn::ConnectError::EndpointStopping => Error::Closed,
        e => Error::InvalidInput(format!("cannot dial {addr} as {server_name:?}: {e}")),
    })?;
    // Whether the QUIC/TLS handshake finished before the timeout: if it did not, no quicseal
    // node answered at `addr` (nothing listens there, or the path drops UDP), which the error
    // says, rather than a bare "handshake".
    let answered = AtomicBool::new(false);
    let result = tokio::time::timeout(shared.limits.handshake_timeout, async {
        let conn = tls_finished(connecting.await, lease)?;
        answered.store(true, Ordering::Relaxed);
        handshake(shared, conn, HandshakeRole::Dialler { epoch, first }, resume).await
    })
    .await;
    let timed_out = if answered.load(Ordering::Relaxed) { Timed::Handshake } else { Timed::NoAnswer };
    result.unwrap_or(Err(Error::Timeout { what: timed_out }))
}

/// The end of a connection's TLS handshake: our verifier has checked the peer's certificate
/// (it is called only during the handshake), so its configuration goes back for the next
/// handshake, and a failure carries the refusal it recorded, if any.
fn tls_finished<T>(
    connected: std::result::Result<Connection, quinn::ConnectionError>,
    lease: Lease<T>,
) -> Result<Connection> {
    let refusal = take_captured(&lease.captured);
    lease.finished();
    connected.map_err(|e| from_connection_error(e, refusal))
}

enum HandshakeRole {
    /// Dialling, with this session epoch; `first` is a new session's first message (channel,
    /// payload), sent right behind our HELLO.
    Dialler { epoch: u64, first: Option<(u16, Bytes)> },
    /// Accepting; the handshake records the peer here (its names digest) once it counts the
    /// connection as one of that peer's.
    Acceptor(Arc<std::sync::OnceLock<Fingerprint>>),
}

/// A connection that passed the quicseal handshake for a new session.
struct Handshaken {
    first: FirstLink,
    /// The session's protocol state: the connection's keys, the peer's HELLO settled, and the
    /// first message if it went out early.
    core: SessionCore,
    /// When the core's clock started.
    started: Instant,
    /// The first message's sequence number, if it went out early.
    first_seq: Option<u64>,
    peer: PeerIdentity,
    /// What the peer's HELLO announced.
    peer_hello: PeerHello,
}

/// What a handshake led to.
enum Outcome {
    /// A connection for a new session.
    New(Box<Handshaken>),
    /// A dialler's new connection for the session it resumes.
    Redialled(Box<LinkParts>),
    /// The acceptor attached the connection to an existing session.
    Resumed,
}

/// Steps 2 to 4 of the module docs, after the TLS handshake. A dialler resuming a session
/// passes the peer it expects (`resume`); an acceptor receiving a resuming HELLO attaches the
/// connection to the session it names.
async fn handshake(
    shared: &Arc<NodeShared>,
    conn: Connection,
    role: HandshakeRole,
    resume: Option<(Fingerprint, u64)>,
) -> Result<Outcome> {
    // Our verifier has done its work (see `tls_finished`): a connection lost from here on was
    // refused by the peer, or lost for another reason, which its error says.
    let lost = |e: quinn::ConnectionError| from_connection_error(e, None);
    let negotiated = conn.handshake_data().and_then(|d| d.downcast::<HandshakeData>().ok()).and_then(|d| d.protocol);
    if negotiated.as_deref() != Some(ALPN) {
        conn.close(VarInt::from_u32(close_code::ALPN_MISMATCH), b"alpn mismatch");
        return Err(Error::AlpnMismatch { negotiated: negotiated.map(|p| String::from_utf8_lossy(&p).into_owned()) });
    }
    let peer = peer_identity(&conn)?;
    if let Err(reason) = shared.policy.check(&peer) {
        conn.close(VarInt::from_u32(close_code::UNAUTHORIZED), b"unauthorized");
        return Err(Error::Unauthorized { side: Side::Local, reason });
    }
    let local_max = shared.limits.max_message_size;
    let (max_channels, window) = (shared.limits.max_channels, shared.limits.replay_window as u32);
    let hello = |epoch: u64, resume: bool| {
        let mut v = Vec::with_capacity(FRAME_HEADER_LEN + wire::HELLO_LEN as usize);
        Frame::Hello { max_message_size: local_max as u32, epoch, resume, max_channels, window }.encode(&mut v);
        Bytes::from(v)
    };
    let retired =
        |fp: &Fingerprint, epoch: u64| shared.retired.lock().unwrap_or_else(|e| e.into_inner()).is_retired(fp, epoch);
    match role {
        HandshakeRole::Dialler { epoch, first } => {
            let (mut send, mut recv) = conn.open_bi().await.map_err(lost)?;
            let header = Bytes::copy_from_slice(&wire::encode_stream_header(StreamKind::Control));
            send.write_all_chunks(&mut [header, hello(epoch, resume.is_some())])
                .await
                .map_err(|e| write_err(e, &lost))?;
            let keys = message_keys(shared, &conn, seal::Role::Dialler)?;
            let Some(resuming) = resume else {
                // A new session: its core is made now, before the acceptor's HELLO, with the
                // bounds every acceptor accepts, so that its first message leaves right behind
                // our HELLO (PROTOCOL.md section 2, "The early message").
                let started = Instant::now();
                let mut core = new_core(shared, epoch, &PeerHello::EARLY, keys);
                let (first_seq, opened) = match first {
                    Some((channel, payload)) => {
                        let (seq, stream) = send_first(&conn, &mut core, 0, channel, payload, &lost).await?;
                        (Some(seq), Some((channel, stream)))
                    }
                    None => (None, None),
                };
                let (peer_hello, _) = read_hello(&conn, &mut recv, &lost).await?;
                let retired = retired(&peer.names_digest, peer_hello.epoch);
                hello::check_answer(None, &peer.names_digest, peer_hello.epoch, retired)
                    .map_err(|r| refuse_hello(&conn, r))?;
                core.on_peer_hello(&peer_hello);
                let first = FirstLink { conn, control: (send, recv), opened };
                return Ok(Outcome::New(Box::new(Handshaken { first, core, started, first_seq, peer, peer_hello })));
            };
            let (peer_hello, _) = read_hello(&conn, &mut recv, &lost).await?;
            let peer_epoch = peer_hello.epoch;
            hello::check_answer(
                Some((&resuming.0, resuming.1)),
                &peer.names_digest,
                peer_epoch,
                retired(&peer.names_digest, peer_epoch),
            )
            .map_err(|r| refuse_hello(&conn, r))?;
            Ok(Outcome::Redialled(Box::new(LinkParts { conn, keys, control: (send, recv) })))
        }
        HandshakeRole::Acceptor(ref counted) => {
            let (mut send, mut recv) = conn.accept_bi().await.map_err(lost)?;
            let mut head = [0u8; STREAM_HEADER_LEN];
            read_exact(&conn, &mut recv, &mut head, &lost).await?;
            match wire::decode_stream_header(head) {
                Ok(StreamKind::Control) => {}
                Ok(_) => return Err(violation(&conn, Violation::NotControlStream)),
                Err(e) => return Err(violation(&conn, Violation::Malformed(e))),
            }
            let (peer_hello, wants_resume) = read_hello(&conn, &mut recv, &lost).await?;
            let peer_epoch = peer_hello.epoch;
            // One peer may hold only so many connections (a resumption replaces one).
            {
                let mut per_peer = shared.per_peer.lock().unwrap_or_else(|e| e.into_inner());
                let open = per_peer.entry(peer.names_digest).or_insert(0);
                hello::check_peer_limit(wants_resume, *open, shared.limits.max_connections_per_peer)
                    .map_err(|r| refuse_hello(&conn, r))?;
                *open += 1;
                let _ = counted.set(peer.names_digest);
            }
            let found = if wants_resume {
                let found = shared
                    .resumable
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&(peer.names_digest, peer_epoch))
                    .cloned();
                found.and_then(|r| r.epoch().map(|e| (e, r)))
            } else {
                None
            };
            let admitted = hello::admit(wants_resume, peer_epoch, retired(&peer.names_digest, peer_epoch), found)
                .map_err(|r| refuse_hello(&conn, r))?;
            let (epoch, resumable) = match admitted {
                Admission::New => (random_epoch()?, None),
                Admission::Resume((epoch, r)) => (epoch, Some(r)),
            };
            send.write_all(&hello(epoch, false)).await.map_err(|e| write_err(e, &lost))?;
            let keys = message_keys(shared, &conn, seal::Role::Acceptor)?;
            if let Some(r) = resumable {
                if !r.resume(LinkParts { conn, keys, control: (send, recv) }) {
                    return Err(Error::ConnectionLost {
                        reason: "the session ended while it was being resumed".into(),
                    });
                }
                return Ok(Outcome::Resumed);
            }
            let (started, core) = (Instant::now(), new_core(shared, epoch, &peer_hello, keys));
            let first = FirstLink { conn, control: (send, recv), opened: None };
            Ok(Outcome::New(Box::new(Handshaken { first, core, started, first_seq: None, peer, peer_hello })))
        }
    }
}

/// The connection's message keys (PROTOCOL.md section 5), from its TLS exporter; the material is
/// wiped once they are derived.
fn message_keys(shared: &NodeShared, conn: &Connection, side: seal::Role) -> Result<(SealingKey, OpeningKey)> {
    let mut material = zeroize::Zeroizing::new([0u8; KEY_MATERIAL_LEN]);
    conn.export_keying_material(&mut material[..], EXPORTER_LABEL, b"")
        .map_err(|_| Error::Internal("TLS exporter unavailable".into()))?;
    let (mut sealing, opening) = seal::derive_keys(&material, side);
    let (messages, bytes) = shared.limits.test_key_limits;
    sealing.set_limits(seal::KeyLimits { messages, bytes });
    Ok((sealing, opening))
}

/// A new session's protocol state over its first connection's keys, with what the peer's
/// HELLO announced ([`PeerHello::EARLY`] for a dialler that has not read it yet).
fn new_core(shared: &NodeShared, epoch: u64, peer: &PeerHello, keys: (SealingKey, OpeningKey)) -> SessionCore {
    let limits = &shared.limits;
    let local_max = limits.max_message_size;
    let config = SessionConfig {
        epoch,
        peer_epoch: 0,
        open: OpenConfig {
            max_payload: local_max,
            window_width: limits.replay_window,
            freshness_ms: limits.freshness.as_millis() as u64,
            max_future_ms: limits.max_clock_skew.as_millis() as u64,
            // The application's channels and the three reserved ones (durable, RPC).
            max_windows: usize::from(limits.max_channels) + 3,
        },
        outbox: OutboxConfig {
            max_messages: limits.outbox_messages,
            max_bytes: limits.outbox_bytes,
            // Settled by the peer's HELLO (its replay window).
            max_per_channel: 0,
            // QUIC already retransmits inside a connection; our timer only fills gaps left by
            // messages the receiver refused (tag, freshness), so it is deliberately slow.
            // After a reconnect everything unacknowledged is resent at once.
            initial_rto_ms: 5_000,
            min_rto_ms: 5_000,
            max_rto_ms: 60_000,
            retransmit_on_timeout: true,
        },
        inbox: InboxConfig {
            reorder_window: limits.replay_window,
            max_buffered_bytes: limits.receive_buffer,
            max_channels: usize::from(limits.max_channels),
            ack_delay_ms: 2,
            ack_every: 64,
            ack_when_drained: true,
            // A caller that took a response usually sends its next request at once, and the
            // acknowledgement rides with it: one packet per call each way, not two.
            lazy_ack_channel: Some(crate::rpc::RESPONSE_CHANNEL),
            auto_ack: !shared.manual_ack,
            reserved_from: Some(crate::rpc::FIRST_RESERVED_CHANNEL),
        },
        max_tag_failures: limits.max_tag_failures,
        max_recv: local_max,
        // Settled by the peer's HELLO.
        max_send: 0,
        max_channels: 0,
        receive_buffer: limits.receive_buffer,
    }
    .with_peer(peer);
    let tally = Tally { session: Arc::default(), node: shared.counters.clone() };
    // The epoch is random: it seeds the retransmission jitter as well as any.
    SessionCore::with_tally(config, keys, epoch, tally)
}

/// Closes `conn` with the refusal's close code and returns the local error that says why.
fn refuse_hello(conn: &Connection, refusal: HelloRefusal) -> Error {
    conn.close(VarInt::from_u32(refusal.close_code()), refusal.close_reason());
    match (refusal.violation(), refusal) {
        (Some(violation), _) => Error::ProtocolViolation { side: Side::Local, violation },
        (None, HelloRefusal::PeerLimit { limit }) => {
            Error::Limit { what: Limited::ConnectionsPerPeer, limit: limit as u64 }
        }
        (None, other) => unreachable!("only the peer limit is not a violation: {other:?}"),
    }
}

/// Dials `addr` and starts a session ([`Node::connect`]); `first` is a first message to send
/// right behind our HELLO ([`Node::connect_and_send_bytes`]), whose sequence number is returned.
async fn connect(
    shared: &Arc<NodeShared>,
    addr: SocketAddr,
    server_name: &str,
    first: Option<(u16, Bytes)>,
) -> Result<(Session, Option<u64>)> {
    let epoch = random_epoch()?;
    let result = match dial(shared, addr, server_name, epoch, None, first).await {
        Ok(Outcome::New(h)) => Ok(*h),
        Ok(_) => Err(Error::Internal("a new dial did not start a new session".into())),
        Err(e) => Err(e),
    };
    let result = result.map(|h| {
        let (peer_fp, peer_epoch) = (h.peer.names_digest, h.peer_hello.epoch);
        let redial: Redial = {
            let (node, name) = (Arc::downgrade(shared), server_name.to_owned());
            Arc::new(move || {
                let (node, name) = (node.clone(), name.clone());
                Box::pin(async move {
                    let node = node.upgrade().ok_or(Error::Closed)?;
                    match dial(&node, addr, &name, epoch, Some((peer_fp, peer_epoch)), None).await? {
                        Outcome::Redialled(parts) => Ok(*parts),
                        _ => Err(Error::Internal("a redial did not resume its session".into())),
                    }
                })
            })
        };
        let durable_dial = shared.durable.is_some().then(|| durable_dial(shared, addr, server_name));
        let first_seq = h.first_seq;
        (start_session(shared, h, Some(redial), durable_dial), first_seq)
    });
    match &result {
        Ok((s, _)) => info!(peer = %s.peer(), remote = %addr, "session established (dialled)"),
        Err(e) => warn!(remote = %addr, error = %e, "dial failed"),
    }
    result
}

/// How the durable layer dials `addr` again (a new session, as [`Node::connect`] does) when
/// durable messages wait for a peer whose sessions are gone.
fn durable_dial(shared: &Arc<NodeShared>, addr: SocketAddr, server_name: &str) -> crate::durable::Dial {
    let (node, name) = (Arc::downgrade(shared), server_name.to_owned());
    Arc::new(move || {
        let (node, name) = (node.clone(), name.clone());
        Box::pin(async move {
            let shared = node.upgrade().ok_or(Error::Closed)?;
            let (session, _) = connect(&shared, addr, &name, None).await?;
            Ok(Box::new(session) as Box<dyn std::any::Any + Send + Sync>)
        })
    })
}

/// Starts a new session over a handshaken connection.
fn start_session(
    shared: &Arc<NodeShared>,
    h: Handshaken,
    redial: Option<Redial>,
    dial: Option<crate::durable::Dial>,
) -> Session {
    let limits = &shared.limits;
    let (fingerprint, peer_epoch) = (h.peer.names_digest, h.peer_hello.epoch);
    let accepted = redial.is_none();
    let on_end: EndHook = {
        let (retired, resumable) = (shared.retired.clone(), shared.resumable.clone());
        Box::new(move |stats| {
            // The session is over: its peer epoch can never be used again.
            retired.lock().unwrap_or_else(|e| e.into_inner()).retire(fingerprint, peer_epoch);
            resumable.lock().unwrap_or_else(|e| e.into_inner()).remove(&(fingerprint, peer_epoch));
            info!(?stats, "session ended");
        })
    };
    let session = Session::start(
        h.first,
        SessionParams {
            core: h.core,
            started: h.started,
            peer: h.peer,
            unread_budget: shared.unread.clone(),
            resume: ResumePolicy {
                backoff_min: limits.reconnect_backoff.0,
                backoff_max: limits.reconnect_backoff.1,
                give_up_after: limits.resume_timeout,
            },
            redial,
            on_end,
            rpc: shared.rpc.clone(),
            durable: shared.durable.clone(),
        },
    );
    if let Some(durable) = &shared.durable {
        durable.attach(fingerprint, session.outlet(), dial);
    }
    if accepted {
        shared
            .resumable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((fingerprint, peer_epoch), session.resumable());
    }
    session
}

fn peer_identity(conn: &Connection) -> Result<PeerIdentity> {
    let chain = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| Error::ConnectionLost { reason: "the peer presented no certificate".into() })?;
    let leaf = chain.first().ok_or_else(|| Error::ConnectionLost { reason: "empty certificate chain".into() })?;
    // The certificate was verified by webpki, so x509-parser reads it too; if it did not, the
    // peer is closed rather than trusted blindly.
    PeerIdentity::from_certificate(leaf).map_err(|e| violation(conn, Violation::UnreadableCertificate(e.to_string())))
}

/// A random, non-zero session epoch.
pub(crate) fn random_epoch() -> Result<u64> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    loop {
        ring::rand::SystemRandom::new().fill(&mut b).map_err(|_| Error::Internal("system RNG failed".into()))?;
        let e = u64::from_be_bytes(b);
        if e != 0 {
            return Ok(e);
        }
    }
}

/// Reads the peer's HELLO, and whether it asks to resume a session.
async fn read_hello(
    conn: &Connection,
    recv: &mut RecvStream,
    lost: &impl Fn(quinn::ConnectionError) -> Error,
) -> Result<(PeerHello, bool)> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    read_exact(conn, recv, &mut head, lost).await?;
    let header = FrameHeader::decode(head, 0).map_err(|e| violation(conn, Violation::Malformed(e)))?;
    if header.frame_type != frame_type::HELLO {
        return Err(violation(conn, Violation::ExpectedHello(header.frame_type)));
    }
    let mut body = [0u8; wire::HELLO_LEN as usize];
    read_exact(conn, recv, &mut body, lost).await?;
    let frame =
        header.decode_body(Bytes::copy_from_slice(&body)).map_err(|e| violation(conn, Violation::Malformed(e)))?;
    PeerHello::from_frame(&frame).map_err(|v| violation(conn, v))
}

async fn read_exact(
    conn: &Connection,
    recv: &mut RecvStream,
    buf: &mut [u8],
    lost: &impl Fn(quinn::ConnectionError) -> Error,
) -> Result<()> {
    match recv.read_exact(buf).await {
        Ok(()) => Ok(()),
        Err(quinn::ReadExactError::FinishedEarly(_)) => {
            Err(violation(conn, Violation::ControlStream("it ended early".into())))
        }
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e))) => Err(lost(e)),
        Err(quinn::ReadExactError::ReadError(e)) => Err(violation(conn, Violation::ControlStream(e.to_string()))),
    }
}

fn write_err(e: quinn::WriteError, lost: &impl Fn(quinn::ConnectionError) -> Error) -> Error {
    match e {
        quinn::WriteError::ConnectionLost(e) => lost(e),
        e => Error::ProtocolViolation { side: Side::Remote, violation: Violation::ControlStream(e.to_string()) },
    }
}

fn violation(conn: &Connection, violation: Violation) -> Error {
    conn.close(VarInt::from_u32(violation.close_code()), violation.close_reason());
    Error::ProtocolViolation { side: Side::Local, violation }
}

impl crate::reload::Reloadable for Node {
    fn reload(&self, identity: Identity, trust: TrustStore) -> Result<()> {
        Node::reload(self, identity, trust)
    }
    fn expiry(&self) -> crate::reload::Expiry {
        Node::expiry(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel grants (it reports twice the size it was asked for).
    fn granted(socket: &std::net::UdpSocket) -> (usize, usize) {
        let s = socket2::SockRef::from(socket);
        (s.recv_buffer_size().unwrap() / 2, s.send_buffer_size().unwrap() / 2)
    }

    fn kernel_max(name: &str) -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}")).unwrap().trim().parse().unwrap()
    }

    /// How many of `n` connection IDs from `generate` were made before (birthday collisions).
    fn repeats(n: usize, mut generate: impl FnMut() -> quinn::ConnectionId) -> usize {
        let mut seen = std::collections::HashSet::with_capacity(n);
        (0..n).filter(|_| !seen.insert(generate())).count()
    }

    #[test]
    fn connection_ids_do_not_repeat_among_hundreds_of_thousands() {
        use quinn::ConnectionIdGenerator;
        // What a node with many connections holds: some IDs per connection, plus a Retry's ID
        // per new dial while handshakes pile up. A repeat misroutes a dial (see RandomCids).
        let n = 300_000;
        let mut ours = cid_generator();
        assert_eq!(repeats(n, || ours.generate_cid()), 0);
        assert_eq!(ours.cid_len(), RANDOM_CID_LEN);
        // quinn's default (the generator the node used before) repeats: about n^2 / 2^25 of
        // them with its 24 random bits, some 2,700 here.
        let mut default = quinn_proto::HashedConnectionIdGenerator::default();
        assert!(repeats(n, || default.generate_cid()) > 100);
    }

    #[test]
    fn the_udp_socket_gets_the_configured_buffers_up_to_the_kernels_cap() {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let wanted = Limits::default().udp_socket_buffer;
        let (recv, send) = granted(&bind_udp(loopback, wanted).unwrap());
        assert_eq!(recv, wanted.min(kernel_max("rmem_max")));
        assert_eq!(send, wanted.min(kernel_max("wmem_max")));
        // 0 keeps the system's default, which is what a plain bind gets.
        let plain = granted(&std::net::UdpSocket::bind(loopback).unwrap());
        assert_eq!(granted(&bind_udp(loopback, 0).unwrap()), plain);
        // IPv6 too.
        let (recv, _) = granted(&bind_udp("[::1]:0".parse().unwrap(), 1 << 20).unwrap());
        assert_eq!(recv, (1usize << 20).min(kernel_max("rmem_max")));
    }
}
