//! [`RpcClient`]: an RPC caller that dials its server itself and retries a call on a new
//! session when one is lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::debug;

use crate::error::{Error, Limited, Result, Timed};
use crate::proto::rpc::{CacheConfig, CallId};
use crate::rpc::{CallOptions, deadline_after, typed};

/// An RPC caller that outlives its sessions: it dials the server when it needs a session, and
/// when the session is lost during a call (it could not be resumed in time), it dials a new one
/// and sends the same call again, with the same identity, until the call's timeout.
///
/// A retried call runs at most once on the server: the server answers it from its at-most-once
/// cache, or joins it to the first attempt still running. That holds within the cache's horizon
/// ([`CacheConfig::horizon_ms`], 2 minutes by default), so a call that is not marked idempotent
/// is retried only while it is younger than [`RpcClient::retry_horizon`] (the same 2 minutes by
/// default; keep it at most the server's horizon). Idempotent calls are retried until their
/// timeout. Calls are not retried when the server answered (any [`Error::Remote`]), when the
/// call's own timeout passed, or when the peer refused us (TLS, authorization).
///
/// ```no_run
/// # async fn run(node: quicseal::Node) -> quicseal::Result<()> {
/// use std::time::Duration;
/// let client = quicseal::RpcClient::new(node, "127.0.0.1:4433".parse().unwrap(), "kv-server")?;
/// let value: Option<String> = client.request("get", "colour", Duration::from_secs(2)).await?;
/// # Ok(()) }
/// ```
pub struct RpcClient {
    node: crate::Node,
    addr: std::net::SocketAddr,
    server_name: String,
    epoch: u64,
    next_id: AtomicU64,
    session: tokio::sync::Mutex<Option<crate::Session>>,
    retry_horizon: Duration,
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient").field("addr", &self.addr).field("server_name", &self.server_name).finish()
    }
}

impl RpcClient {
    /// A client of the server at `addr`, whose certificate must carry `server_name`. Nothing is
    /// dialled until the first call.
    pub fn new(node: crate::Node, addr: std::net::SocketAddr, server_name: impl Into<String>) -> Result<RpcClient> {
        Ok(RpcClient {
            node,
            addr,
            server_name: server_name.into(),
            epoch: crate::node::random_epoch()?,
            next_id: AtomicU64::new(1),
            session: tokio::sync::Mutex::new(None),
            retry_horizon: Duration::from_millis(CacheConfig::default().horizon_ms),
        })
    }

    /// How long after its first attempt a call that is not idempotent may still be retried.
    pub fn retry_horizon(mut self, horizon: Duration) -> RpcClient {
        self.retry_horizon = horizon;
        self
    }

    /// The session calls go over now, dialling one if there is none or it ended.
    pub async fn session(&self) -> Result<crate::Session> {
        let mut current = self.session.lock().await;
        if let Some(s) = current.as_ref().filter(|s| !s.is_ended()) {
            return Ok(s.clone());
        }
        *current = None;
        let session = self.node.connect(self.addr, &self.server_name).await?;
        *current = Some(session.clone());
        Ok(session)
    }

    /// Typed call, as [`Session::request`](crate::Session::request), with retries.
    pub async fn request<Req, Resp>(&self, method: &str, request: &Req, timeout: Duration) -> Result<Resp>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.request_with(method, request, CallOptions::new(timeout)).await
    }

    /// [`RpcClient::request`] with [`CallOptions`].
    pub async fn request_with<Req, Resp>(&self, method: &str, request: &Req, options: CallOptions) -> Result<Resp>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        typed(request, |body| self.request_bytes(method, body, options)).await
    }

    /// Raw call, as [`Session::request_bytes`](crate::Session::request_bytes), with retries.
    pub async fn request_bytes(&self, method: &str, body: impl Into<Bytes>, options: CallOptions) -> Result<Bytes> {
        let body = body.into();
        let call = CallId { epoch: self.epoch, id: self.next_id.fetch_add(1, Ordering::Relaxed) };
        let first = Instant::now();
        let deadline = deadline_after(options.timeout);
        let mut backoff = Duration::from_millis(50);
        loop {
            let may_retry =
                || (options.idempotent || first.elapsed() < self.retry_horizon) && Instant::now() + backoff < deadline;
            let session = match tokio::time::timeout_at(deadline, self.session()).await {
                Err(_) => return Err(Error::Timeout { what: Timed::RpcCall }),
                Ok(Ok(s)) => s,
                Ok(Err(e)) if transient(&e) && may_retry() => {
                    debug!(error = %e, "RPC client: dialling failed, trying again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                Ok(Err(e)) => return Err(e),
            };
            match session.call(call, method, body.clone(), options.idempotent, deadline).await {
                Err(e) if session.is_ended() && transient(&e) && may_retry() => {
                    debug!(error = %e, ?call, "RPC client: session lost during a call, retrying it");
                    continue;
                }
                other => return other,
            }
        }
    }
}

/// Failures that a new connection may cure: the network, not the peer's judgement of us.
fn transient(e: &Error) -> bool {
    match e {
        Error::Timeout { what } => what.is_transient(),
        _ => matches!(
            e,
            Error::ConnectionLost { .. }
                | Error::Refused
                | Error::Io(_)
                | Error::Limit { what: Limited::ConnectionsPerNode, .. }
        ),
    }
}
