//! The calling side: a session's calls waiting for their responses.

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Outlet, REQUEST_CHANNEL, REQUEST_OVERHEAD, SessionRpc};
use crate::error::{ApplicationError, Error, RemoteError, Result, Timed};
use crate::proto::rpc::{CallId, MAX_METHOD_LEN, RpcFrame, Status};
use crate::stats::Counter;

impl SessionRpc {
    /// Handles one message from the response channel. `Err` is a protocol violation.
    pub(crate) fn on_response<O: Outlet>(&self, outlet: &O, payload: &Bytes) -> std::result::Result<(), String> {
        match RpcFrame::decode(payload) {
            Ok(RpcFrame::Response { call, status, body }) => {
                match self.pending().remove(&call) {
                    Some(tx) => {
                        let _ = tx.send((status, body));
                    }
                    None => outlet.count(Counter::rpc_late_responses),
                }
                Ok(())
            }
            Ok(_) => Err("a request or cancel on the RPC response channel".into()),
            Err(e) => Err(format!("malformed RPC response: {e}")),
        }
    }

    /// Makes a call on this session and waits for its response. The call's identity is
    /// chosen by the caller (the session's own epoch, or an [`RpcClient`]'s).
    pub(crate) async fn call<O: Outlet>(
        &self,
        outlet: &O,
        call: CallId,
        method: &str,
        body: Bytes,
        idempotent: bool,
        deadline: Instant,
    ) -> Result<Bytes> {
        let timeout = || Error::Timeout { what: Timed::RpcCall };
        if method.is_empty() || method.len() > MAX_METHOD_LEN {
            return Err(Error::InvalidInput(format!("RPC method names are 1 to {MAX_METHOD_LEN} bytes")));
        }
        let overhead = REQUEST_OVERHEAD + method.len();
        let size = body.len() + overhead;
        if size > outlet.max_send() {
            return Err(Error::MessageTooLarge { size: body.len(), limit: outlet.max_send().saturating_sub(overhead) });
        }
        let _slot = tokio::select! {
            p = self.pending_permits.clone().acquire_owned() => p.map_err(|_| Error::Closed)?,
            _ = tokio::time::sleep_until(deadline) => return Err(timeout()),
        };
        let (tx, rx) = oneshot::channel();
        if self.pending().insert(call, tx).is_some() {
            return Err(Error::InvalidInput(format!("RPC call {call:?} is already waiting on this session")));
        }
        let mut guard = AwaitedCall { rpc: self, outlet, call, answered: false };
        if outlet.is_ended() {
            return Err(outlet.error());
        }
        let budget = deadline.saturating_duration_since(Instant::now()).as_millis().clamp(1, u128::from(u32::MAX));
        let mut frame = Vec::with_capacity(size);
        RpcFrame::Request { call, method: method.to_owned(), budget_ms: budget as u32, idempotent, body }
            .encode(&mut frame)
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        outlet.count(Counter::rpc_calls);
        tokio::select! {
            r = outlet.send(REQUEST_CHANNEL, frame.into()) => r?,
            _ = tokio::time::sleep_until(deadline) => return Err(timeout()),
        }
        let (status, body) = tokio::select! {
            r = rx => match r {
                Ok(answer) => answer,
                // The session ended and took the pending call with it.
                Err(_) => return Err(outlet.error()),
            },
            _ = tokio::time::sleep_until(deadline) => return Err(timeout()),
        };
        guard.answered = true;
        match status {
            Status::Ok => Ok(body),
            Status::Application { code, message } => {
                Err(Error::Remote(RemoteError::Application(ApplicationError { code, message })))
            }
            Status::UnknownMethod => Err(Error::Remote(RemoteError::UnknownMethod)),
            Status::Overloaded => Err(Error::Remote(RemoteError::Overloaded)),
            Status::DeadlineExceeded => Err(Error::Timeout { what: Timed::RpcDeadlineAtServer }),
            Status::HandlerPanicked => Err(Error::Remote(RemoteError::HandlerPanicked)),
            Status::RequestTooLarge => Err(Error::Remote(RemoteError::RequestTooLarge)),
            Status::Cancelled => Err(Error::Remote(RemoteError::Cancelled)),
            Status::InvalidRequest => Err(Error::Remote(RemoteError::InvalidRequest)),
            Status::Internal => Err(Error::Remote(RemoteError::Internal)),
        }
    }
}

/// A call waiting for its response. Dropped before the response came (the caller's future was
/// dropped, or its timeout fired), it tells the server to cancel the call.
pub(super) struct AwaitedCall<'a, O: Outlet> {
    rpc: &'a SessionRpc,
    outlet: &'a O,
    call: CallId,
    answered: bool,
}

impl<O: Outlet> Drop for AwaitedCall<'_, O> {
    fn drop(&mut self) {
        self.rpc.pending().remove(&self.call);
        if !self.answered && !self.outlet.is_ended() {
            let mut frame = Vec::with_capacity(17);
            if (RpcFrame::Cancel { call: self.call }).encode(&mut frame).is_ok() {
                // Best effort: with a full outbox the server's deadline ends the call instead.
                let _ = self.outlet.try_send(REQUEST_CHANNEL, frame.into());
            }
        }
    }
}
