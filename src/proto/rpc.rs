//! Request/response frames and the server's at-most-once response cache (sans-IO).
//!
//! RPC frames travel as the payloads of ordinary sealed, reliable channel messages, so they get
//! integrity tags, replay protection and exactly-once delivery across reconnects for free. This
//! module only defines their layout and the cache that keeps a retried request from running its
//! handler twice. The async side (routing, deadlines, cancellation) is in `crate::rpc`.
//!
//! Every frame names its call by a [`CallId`]: the caller's epoch and a request id. Layout
//! (integers big-endian), after a one-byte kind:
//!
//! | kind | fields |
//! |---|---|
//! | `0x01` REQUEST | `epoch` u64, `id` u64, `flags` u8 (`0x01` idempotent), `budget_ms` u32 (relative deadline), `method_len` u8 (1 to 255), `method` (UTF-8), body (rest) |
//! | `0x02` RESPONSE | `epoch` u64, `id` u64, `status` u8, for status `0x01` APPLICATION: `code` u32, `message_len` u16 (at most 1,024), `message` (UTF-8); body (rest) |
//! | `0x03` CANCEL | `epoch` u64, `id` u64, nothing else |
//!
//! Deadlines travel as relative budgets (as tarpc does), so clock skew between nodes does not
//! break them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;

use bytes::Bytes;

/// Longest method name, bytes.
pub const MAX_METHOD_LEN: usize = 255;
/// Longest application error message, bytes.
pub const MAX_ERROR_MESSAGE_LEN: usize = 1024;

/// The identity of a call: the caller's epoch (random, chosen by the caller) and a request id
/// unique within that epoch. A retry of a call carries the same identity, which is what lets
/// the server run it at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId {
    /// The caller's epoch.
    pub epoch: u64,
    /// The request id within the epoch.
    pub id: u64,
}

/// How a call ended, as the server reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// The handler returned a response (in the body).
    Ok,
    /// The handler returned an application error.
    Application {
        /// Application-defined code.
        code: u32,
        /// Human-readable message.
        message: String,
    },
    /// No handler for the method.
    UnknownMethod,
    /// The server's concurrency limit was reached.
    Overloaded,
    /// The budget ran out before the handler finished.
    DeadlineExceeded,
    /// The handler panicked (the server survived).
    HandlerPanicked,
    /// The request was larger than the server accepts.
    RequestTooLarge,
    /// The caller cancelled the call.
    Cancelled,
    /// The request body does not decode as the method's request type.
    InvalidRequest,
    /// The server could not send the handler's response (it did not encode, or it was over the
    /// message size limit); the handler did run.
    Internal,
}

impl Status {
    fn code(&self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Application { .. } => 1,
            Status::UnknownMethod => 2,
            Status::Overloaded => 3,
            Status::DeadlineExceeded => 4,
            Status::HandlerPanicked => 5,
            Status::RequestTooLarge => 6,
            Status::Cancelled => 7,
            Status::InvalidRequest => 8,
            Status::Internal => 9,
        }
    }
}

/// One RPC frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpcFrame {
    /// A call.
    Request {
        /// Which call.
        call: CallId,
        /// The method name.
        method: String,
        /// Milliseconds the caller will wait, from when the server receives it.
        budget_ms: u32,
        /// The caller marked the call safe to run more than once.
        idempotent: bool,
        /// The encoded request.
        body: Bytes,
    },
    /// The answer to a call.
    Response {
        /// Which call.
        call: CallId,
        /// How it ended.
        status: Status,
        /// The encoded response (empty unless `status` is [`Status::Ok`]).
        body: Bytes,
    },
    /// The caller gave up on a call.
    Cancel {
        /// Which call.
        call: CallId,
    },
}

/// Why bytes are not an RPC frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// Input ended inside a field.
    #[error("truncated RPC frame")]
    Truncated,
    /// A kind other than request, response or cancel.
    #[error("unknown RPC frame kind {0:#04x}")]
    UnknownKind(u8),
    /// A status this version does not define.
    #[error("unknown RPC status {0:#04x}")]
    UnknownStatus(u8),
    /// Flags this version does not define.
    #[error("unknown RPC flags {0:#04x}")]
    UnknownFlags(u8),
    /// An empty method name.
    #[error("empty method name")]
    EmptyMethod,
    /// A method name or message that is not UTF-8.
    #[error("method name or message is not UTF-8")]
    NotUtf8,
    /// A method name over [`MAX_METHOD_LEN`] (when encoding).
    #[error("method name of {0} bytes is over the limit")]
    MethodTooLong(usize),
    /// An error message over [`MAX_ERROR_MESSAGE_LEN`].
    #[error("error message of {0} bytes is over the limit")]
    MessageTooLong(usize),
    /// Bytes after a CANCEL.
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RpcError> {
        let end = self.at.checked_add(n).ok_or(RpcError::Truncated)?;
        let s = self.bytes.get(self.at..end).ok_or(RpcError::Truncated)?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, RpcError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RpcError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, RpcError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, RpcError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn str(&mut self, n: usize) -> Result<String, RpcError> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| RpcError::NotUtf8)
    }
}

impl RpcFrame {
    /// Decodes a whole message payload as one RPC frame. Never panics; allocates only for
    /// the method name or error message, both bounded.
    pub fn decode(bytes: &Bytes) -> Result<RpcFrame, RpcError> {
        let mut r = Reader { bytes, at: 0 };
        let kind = r.u8()?;
        let call = CallId { epoch: r.u64()?, id: r.u64()? };
        match kind {
            0x01 => {
                let flags = r.u8()?;
                if flags & !0x01 != 0 {
                    return Err(RpcError::UnknownFlags(flags));
                }
                let budget_ms = r.u32()?;
                let len = r.u8()? as usize;
                if len == 0 {
                    return Err(RpcError::EmptyMethod);
                }
                let method = r.str(len)?;
                Ok(RpcFrame::Request {
                    call,
                    method,
                    budget_ms,
                    idempotent: flags & 0x01 != 0,
                    body: bytes.slice(r.at..),
                })
            }
            0x02 => {
                let status = match r.u8()? {
                    0 => Status::Ok,
                    1 => {
                        let code = r.u32()?;
                        let len = r.u16()? as usize;
                        if len > MAX_ERROR_MESSAGE_LEN {
                            return Err(RpcError::MessageTooLong(len));
                        }
                        Status::Application { code, message: r.str(len)? }
                    }
                    2 => Status::UnknownMethod,
                    3 => Status::Overloaded,
                    4 => Status::DeadlineExceeded,
                    5 => Status::HandlerPanicked,
                    6 => Status::RequestTooLarge,
                    7 => Status::Cancelled,
                    8 => Status::InvalidRequest,
                    9 => Status::Internal,
                    s => return Err(RpcError::UnknownStatus(s)),
                };
                Ok(RpcFrame::Response { call, status, body: bytes.slice(r.at..) })
            }
            0x03 if r.at == bytes.len() => Ok(RpcFrame::Cancel { call }),
            0x03 => Err(RpcError::TrailingBytes(bytes.len() - r.at)),
            k => Err(RpcError::UnknownKind(k)),
        }
    }

    /// Encodes the frame. Method names over [`MAX_METHOD_LEN`] or empty, and error messages
    /// over [`MAX_ERROR_MESSAGE_LEN`], are refused.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), RpcError> {
        match self {
            RpcFrame::Request { call, method, budget_ms, idempotent, body } => {
                if method.is_empty() {
                    return Err(RpcError::EmptyMethod);
                }
                let len = u8::try_from(method.len()).map_err(|_| RpcError::MethodTooLong(method.len()))?;
                out.push(0x01);
                put_call(out, call);
                out.push(u8::from(*idempotent));
                out.extend_from_slice(&budget_ms.to_be_bytes());
                out.push(len);
                out.extend_from_slice(method.as_bytes());
                out.extend_from_slice(body);
            }
            RpcFrame::Response { call, status, body } => {
                if let Status::Application { message, .. } = status
                    && message.len() > MAX_ERROR_MESSAGE_LEN
                {
                    return Err(RpcError::MessageTooLong(message.len()));
                }
                out.push(0x02);
                put_call(out, call);
                out.push(status.code());
                if let Status::Application { code, message } = status {
                    out.extend_from_slice(&code.to_be_bytes());
                    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
                    out.extend_from_slice(message.as_bytes());
                }
                out.extend_from_slice(body);
            }
            RpcFrame::Cancel { call } => {
                out.push(0x03);
                put_call(out, call);
            }
        }
        Ok(())
    }

    /// The call this frame belongs to.
    pub fn call(&self) -> CallId {
        match self {
            RpcFrame::Request { call, .. } | RpcFrame::Response { call, .. } | RpcFrame::Cancel { call } => *call,
        }
    }
}

fn put_call(out: &mut Vec<u8>, call: &CallId) {
    out.extend_from_slice(&call.epoch.to_be_bytes());
    out.extend_from_slice(&call.id.to_be_bytes());
}

/// Bounds of the response cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Most remembered calls (finished or running).
    pub max_entries: usize,
    /// Most bytes of cached response bodies.
    pub max_bytes: usize,
    /// How long a finished call's response is kept, ms. A retry that arrives later is treated
    /// as a new call: it runs again if the caller marked it idempotent, and is otherwise the
    /// caller's to avoid (the client retries automatically only within this horizon).
    pub horizon_ms: u64,
}

impl Default for CacheConfig {
    /// 10,000 calls, 16 MiB, 2 minutes (NATS JetStream's duplicate window).
    fn default() -> Self {
        CacheConfig { max_entries: 10_000, max_bytes: 16 << 20, horizon_ms: 120_000 }
    }
}

/// What to do with an incoming request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// First time: run the handler, then call [`ResponseCache::finish`].
    Run,
    /// The same call is running now: wait for its response, do not run it again.
    Running,
    /// The call already finished: answer with this, do not run it again.
    Answer(Status, Bytes),
}

#[derive(Debug)]
enum Entry {
    Running,
    Done { status: Status, body: Bytes },
}

/// A cache key that names who made the call, so that callers share the cache fairly.
pub trait CallKey: Hash + Eq + Clone {
    /// Who made the call (quicseal: the caller's certificate).
    type Caller: Hash + Eq + Clone;
    /// The caller of this call.
    fn caller(&self) -> Self::Caller;
}

/// A (caller, call) pair: the first element is the caller.
impl<C: Hash + Eq + Clone, I: Hash + Eq + Clone> CallKey for (C, I) {
    type Caller = C;
    fn caller(&self) -> C {
        self.0.clone()
    }
}

/// A bare number: every call from the same (one) caller.
impl CallKey for u64 {
    type Caller = ();
    fn caller(&self) {}
}

/// The server's at-most-once memory of calls, keyed by whatever identifies a call (quicseal
/// uses (peer key, peer epoch, request id)). Bounded by count, bytes and time; a running call
/// is never forgotten.
///
/// Fair shares: when the cache is over a bound, the call forgotten is the oldest finished call
/// of the caller holding the most calls. A caller flooding cheap calls thus forgets its own,
/// and can make another caller's calls be forgotten only while that caller holds as many.
#[derive(Debug)]
pub struct ResponseCache<K: CallKey> {
    config: CacheConfig,
    entries: HashMap<K, Entry>,
    /// Finished calls by finishing order, with their finishing time (for the horizon).
    done: BTreeMap<u64, (u64, K)>,
    next_order: u64,
    /// Per caller: calls held (running and finished), and its finished calls' orders.
    callers: HashMap<K::Caller, CallerShare>,
    bytes: usize,
    /// Finished calls forgotten before their horizon (over the bounds), not yet taken.
    early: u64,
}

#[derive(Debug, Default)]
struct CallerShare {
    held: usize,
    finished: BTreeSet<u64>,
}

impl<K: CallKey> ResponseCache<K> {
    /// An empty cache.
    pub fn new(config: CacheConfig) -> ResponseCache<K> {
        ResponseCache {
            config,
            entries: HashMap::new(),
            done: BTreeMap::new(),
            next_order: 0,
            callers: HashMap::new(),
            bytes: 0,
            early: 0,
        }
    }

    /// Decides about a request for `key` arriving at `now`. When the cache is full, a finished
    /// call is forgotten to make room (an early eviction; see the fair shares above); `None`
    /// means no finished call may be forgotten for this caller (the cache is full of running
    /// calls, or of finished calls of callers holding fewer than this one): answer
    /// [`Status::Overloaded`].
    pub fn begin(&mut self, key: K, now: u64) -> Option<Begin> {
        self.evict(now);
        match self.entries.get(&key) {
            Some(Entry::Running) => return Some(Begin::Running),
            Some(Entry::Done { status, body, .. }) => return Some(Begin::Answer(status.clone(), body.clone())),
            None => {}
        }
        let caller = key.caller();
        while self.entries.len() >= self.config.max_entries {
            let mine = self.callers.get(&caller).map_or(0, |c| c.held);
            let victim = self.largest_with_finished()?;
            if self.callers[&victim].held < mine {
                // This caller holds the most, all of it running: it waits for its own calls.
                return None;
            }
            self.forget_oldest_of(&victim);
            self.early += 1;
        }
        self.entries.insert(key, Entry::Running);
        self.callers.entry(caller).or_default().held += 1;
        Some(Begin::Run)
    }

    /// Records how a call that [`ResponseCache::begin`] said to run ended.
    pub fn finish(&mut self, key: K, status: Status, body: Bytes, now: u64) {
        let Some(entry) = self.entries.get_mut(&key) else { return };
        if !matches!(entry, Entry::Running) {
            return;
        }
        let order = self.next_order;
        self.next_order += 1;
        self.bytes += body.len();
        *entry = Entry::Done { status, body };
        self.callers.entry(key.caller()).or_default().finished.insert(order);
        self.done.insert(order, (now, key));
        self.evict(now);
    }

    /// Forgets a call that [`ResponseCache::begin`] said to run but that did not start after all
    /// (the server was overloaded): a retry may run it.
    pub fn abandon(&mut self, key: &K) {
        if matches!(self.entries.get(key), Some(Entry::Running)) {
            self.entries.remove(key);
            self.release(&key.caller());
        }
    }

    /// Forgets finished calls older than the horizon, then, while over a bound, the oldest
    /// finished call of the caller holding the most.
    pub fn evict(&mut self, now: u64) {
        while let Some((&order, &(at, _))) = self.done.first_key_value() {
            if now.saturating_sub(at) <= self.config.horizon_ms {
                break;
            }
            self.forget(order);
        }
        while self.entries.len() > self.config.max_entries || self.bytes > self.config.max_bytes {
            let Some(victim) = self.largest_with_finished() else { break };
            self.forget_oldest_of(&victim);
            self.early += 1;
        }
    }

    /// The caller holding the most calls among those with a finished call to forget.
    fn largest_with_finished(&self) -> Option<K::Caller> {
        self.callers.iter().filter(|(_, c)| !c.finished.is_empty()).max_by_key(|(_, c)| c.held).map(|(k, _)| k.clone())
    }

    fn forget_oldest_of(&mut self, caller: &K::Caller) {
        if let Some(&order) = self.callers.get(caller).and_then(|c| c.finished.first()) {
            self.forget(order);
        }
    }

    /// Forgets the finished call of this finishing order.
    fn forget(&mut self, order: u64) {
        let Some((_, key)) = self.done.remove(&order) else { return };
        if let Some(Entry::Done { body, .. }) = self.entries.remove(&key) {
            self.bytes -= body.len();
        }
        let caller = key.caller();
        if let Some(c) = self.callers.get_mut(&caller) {
            c.finished.remove(&order);
        }
        self.release(&caller);
    }

    /// One call fewer held by `caller`.
    fn release(&mut self, caller: &K::Caller) {
        if let Some(c) = self.callers.get_mut(caller) {
            c.held -= 1;
            if c.held == 0 {
                self.callers.remove(caller);
            }
        }
    }

    /// How many finished calls were forgotten before their horizon because the cache was over
    /// its bounds, since the last call of this method. A retry of such a call runs again.
    pub fn take_early_evictions(&mut self) -> u64 {
        std::mem::take(&mut self.early)
    }

    /// Remembered calls (running and finished).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of cached response bodies.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Calls `caller` holds (running and finished).
    pub fn held_by(&self, caller: &K::Caller) -> usize {
        self.callers.get(caller).map_or(0, |c| c.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(f: &RpcFrame) -> Bytes {
        let mut v = Vec::new();
        f.encode(&mut v).unwrap();
        v.into()
    }

    fn c(id: u64) -> CallId {
        CallId { epoch: 0x0102_0304_0506_0708, id }
    }

    fn samples() -> Vec<RpcFrame> {
        vec![
            RpcFrame::Request {
                call: c(7),
                method: "kv.get".into(),
                budget_ms: 1500,
                idempotent: true,
                body: Bytes::from_static(b"key"),
            },
            RpcFrame::Request {
                call: CallId { epoch: u64::MAX, id: u64::MAX },
                method: "m".into(),
                budget_ms: 0,
                idempotent: false,
                body: Bytes::new(),
            },
            RpcFrame::Response { call: c(7), status: Status::Ok, body: Bytes::from_static(b"value") },
            RpcFrame::Response {
                call: c(8),
                status: Status::Application { code: 404, message: "no such key".into() },
                body: Bytes::new(),
            },
            RpcFrame::Response { call: c(9), status: Status::HandlerPanicked, body: Bytes::new() },
            RpcFrame::Response { call: c(10), status: Status::Cancelled, body: Bytes::new() },
            RpcFrame::Response { call: c(11), status: Status::InvalidRequest, body: Bytes::new() },
            RpcFrame::Response { call: c(12), status: Status::Internal, body: Bytes::new() },
            RpcFrame::Cancel { call: c(13) },
        ]
    }

    #[test]
    fn round_trips_and_exact_bytes() {
        for f in samples() {
            assert_eq!(RpcFrame::decode(&enc(&f)).unwrap(), f);
        }
        let req = enc(&samples()[0]);
        assert_eq!(
            &req[..],
            b"\x01\x01\x02\x03\x04\x05\x06\x07\x08\x00\x00\x00\x00\x00\x00\x00\x07\x01\x00\x00\x05\xdc\x06kv.getkey"
        );
        for f in samples() {
            assert_eq!(f.call(), RpcFrame::decode(&enc(&f)).unwrap().call());
        }
    }

    // PROTOCOL.md, section "Test vectors".
    #[test]
    fn protocol_md_vectors() {
        let doc = include_str!("../../PROTOCOL.md");
        let call = CallId { epoch: 0x0102_0304_0506_0708, id: 7 };
        let cases = [
            (
                "vector-rpc-request",
                RpcFrame::Request {
                    call,
                    method: "kv.get".into(),
                    budget_ms: 1500,
                    idempotent: true,
                    body: Bytes::from_static(b"key"),
                },
            ),
            (
                "vector-rpc-response",
                RpcFrame::Response {
                    call,
                    status: Status::Application { code: 404, message: "no such key".into() },
                    body: Bytes::new(),
                },
            ),
            ("vector-rpc-cancel", RpcFrame::Cancel { call }),
        ];
        for (name, frame) in cases {
            let bytes = crate::proto::wire::tests::vector(doc, name);
            assert_eq!(enc(&frame), bytes, "{name}");
            assert_eq!(RpcFrame::decode(&bytes).unwrap(), frame, "{name}");
        }
    }

    #[test]
    fn every_error_path() {
        let d = |b: &[u8]| RpcFrame::decode(&Bytes::copy_from_slice(b));
        assert_eq!(d(&[]), Err(RpcError::Truncated));
        assert_eq!(d(&[9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), Err(RpcError::UnknownKind(9)));
        assert_eq!(
            d(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 1, b'm']),
            Err(RpcError::UnknownFlags(2))
        );
        assert_eq!(
            d(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(RpcError::EmptyMethod)
        );
        assert_eq!(
            d(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff]),
            Err(RpcError::NotUtf8)
        );
        assert_eq!(
            d(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, b'a']),
            Err(RpcError::Truncated)
        );
        assert_eq!(d(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10]), Err(RpcError::UnknownStatus(10)));
        assert_eq!(
            d(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0x04, 0x01]),
            Err(RpcError::MessageTooLong(1025))
        );
        assert_eq!(d(&[3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]), Err(RpcError::TrailingBytes(1)));
        let mut out = Vec::new();
        let long = RpcFrame::Request {
            call: c(1),
            method: "x".repeat(256),
            budget_ms: 0,
            idempotent: false,
            body: Bytes::new(),
        };
        assert_eq!(long.encode(&mut out), Err(RpcError::MethodTooLong(256)));
        let empty = RpcFrame::Request {
            call: c(1),
            method: String::new(),
            budget_ms: 0,
            idempotent: false,
            body: Bytes::new(),
        };
        assert_eq!(empty.encode(&mut out), Err(RpcError::EmptyMethod));
        assert!(out.is_empty());
    }

    #[test]
    fn truncation_at_every_length_and_arbitrary_bytes_never_panic() {
        for f in samples() {
            let full = enc(&f);
            for cut in 0..full.len() {
                let r = RpcFrame::decode(&full.slice(..cut));
                // A request or response may legitimately end where its body starts.
                if let Ok(g) = r {
                    assert!(!matches!(g, RpcFrame::Cancel { .. }));
                }
            }
        }
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 48) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8 ^ (i as u8).wrapping_mul(31)).collect();
            let _ = RpcFrame::decode(&bytes.into());
        }
    }

    #[test]
    fn at_most_once_while_running_and_after() {
        let mut c = ResponseCache::new(CacheConfig::default());
        assert_eq!(c.begin(("peer", 1u64), 0), Some(Begin::Run));
        assert_eq!(c.begin(("peer", 1), 5), Some(Begin::Running), "a retry while it runs does not run it again");
        c.finish(("peer", 1), Status::Ok, Bytes::from_static(b"answer"), 10);
        assert_eq!(c.begin(("peer", 1), 20), Some(Begin::Answer(Status::Ok, Bytes::from_static(b"answer"))));
        assert_eq!(c.begin(("other", 1), 20), Some(Begin::Run), "keys are per caller");
        // Past the horizon the call is forgotten: a late retry would run again.
        assert_eq!(c.begin(("peer", 1), 10 + 120_001), Some(Begin::Run));
        assert_eq!(c.take_early_evictions(), 0, "expiry is not an early eviction");
    }

    #[test]
    fn a_cache_full_of_finished_calls_makes_room_instead_of_refusing() {
        // Found by the compare benchmark: 20,000 calls within the horizon filled the 10,000
        // entries with finished calls and every new call was refused as overloaded.
        let mut c = ResponseCache::new(CacheConfig { max_entries: 2, max_bytes: 1 << 20, horizon_ms: 1_000_000 });
        for k in 0..100u64 {
            assert_eq!(c.begin(k, k), Some(Begin::Run), "call {k}");
            c.finish(k, Status::Ok, Bytes::from_static(b"r"), k);
            assert!(c.len() <= 2);
        }
        assert_eq!(c.take_early_evictions(), 98);
        assert_eq!(c.begin(99, 200), Some(Begin::Answer(Status::Ok, Bytes::from_static(b"r"))), "the newest stays");
        assert_eq!(c.begin(0, 200), Some(Begin::Run), "the oldest went");
    }

    #[test]
    fn bounded_by_count_and_bytes_and_running_calls_are_never_forgotten() {
        let mut c = ResponseCache::new(CacheConfig { max_entries: 3, max_bytes: 10, horizon_ms: 1_000_000 });
        assert_eq!(c.begin(1u64, 0), Some(Begin::Run));
        assert_eq!(c.begin(2, 0), Some(Begin::Run));
        assert_eq!(c.begin(3, 0), Some(Begin::Run));
        assert_eq!(c.begin(4, 0), None, "full of running calls: overloaded");
        c.finish(1, Status::Ok, Bytes::from_static(b"123456"), 1);
        c.finish(2, Status::Ok, Bytes::from_static(b"123456"), 2); // 12 bytes > 10: 1 is evicted
        assert_eq!(c.bytes(), 6);
        assert_eq!(c.take_early_evictions(), 1);
        assert_eq!(c.take_early_evictions(), 0);
        assert_eq!(c.begin(1, 3), Some(Begin::Run));
        assert_eq!(c.begin(3, 3), Some(Begin::Running));
        assert_eq!(c.len(), 3);
        // finish for an unknown or already finished key changes nothing.
        c.finish(99, Status::Ok, Bytes::from_static(b"x"), 4);
        c.finish(2, Status::Cancelled, Bytes::new(), 4);
        assert_eq!(c.begin(2, 5), Some(Begin::Answer(Status::Ok, Bytes::from_static(b"123456"))));
        // An abandoned call (never started) is forgotten; a finished one is not.
        c.abandon(&3);
        c.abandon(&2);
        assert_eq!(c.begin(3, 6), Some(Begin::Run));
        assert_eq!(c.begin(2, 6), Some(Begin::Answer(Status::Ok, Bytes::from_static(b"123456"))));
    }

    /// One caller flooding cheap calls forgets its own finished calls, not another caller's.
    #[test]
    fn a_flooding_caller_evicts_its_own_calls_not_others() {
        let mut c = ResponseCache::new(CacheConfig { max_entries: 10, max_bytes: 1 << 20, horizon_ms: 1_000_000 });
        for id in 0..3u64 {
            assert_eq!(c.begin(("quiet", id), 0), Some(Begin::Run));
            c.finish(("quiet", id), Status::Ok, Bytes::from_static(b"q"), 0);
        }
        for id in 0..1000u64 {
            assert_eq!(c.begin(("flood", id), id), Some(Begin::Run));
            c.finish(("flood", id), Status::Ok, Bytes::new(), id);
        }
        for id in 0..3u64 {
            assert_eq!(c.begin(("quiet", id), 2000), Some(Begin::Answer(Status::Ok, Bytes::from_static(b"q"))));
        }
        assert_eq!((c.held_by(&"quiet"), c.held_by(&"flood"), c.len()), (3, 7, 10));
        // A caller whose share is all running waits for its own calls to finish.
        let mut c = ResponseCache::new(CacheConfig { max_entries: 4, max_bytes: 1 << 20, horizon_ms: 1_000_000 });
        c.begin(("quiet", 0), 0);
        c.finish(("quiet", 0), Status::Ok, Bytes::new(), 0);
        for id in 0..3u64 {
            assert_eq!(c.begin(("flood", id), 0), Some(Begin::Run));
        }
        assert_eq!(c.begin(("flood", 9), 0), None, "holds the most, none finished: overloaded");
        assert_eq!(c.held_by(&"quiet"), 1, "the other caller's call is kept");
    }
}
