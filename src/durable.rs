//! Durable channels in the shell (PROTOCOL.md section 10): between the node's sessions and its
//! store (a [`DurableStore`]).
//!
//! - **Sending**: [`Durable::send`] puts the message in the store (durable before it returns),
//!   then wakes the peer's **pump**: one task per peer that sends the stream's messages in
//!   `dseq` order over one session with that peer at a time (the oldest live one), reading them
//!   from the store; when that session ends it starts again from the oldest message not yet
//!   covered by a RECEIPT, on the next session (dialled or accepted).
//! - **Receiving**: a session's channel reader hands the DURABLE frames it received to
//!   [`Durable::take`], in order. DATA frames are queued for the store's committer in that order
//!   (so they share commits), and a per-session task waits for their commits in order, hands
//!   new messages to the application ([`Durable::recv`]) and sends RECEIPTs. While the store's
//!   inbox is full, frames are left in the session (flow control holds the sender back).
//! - **Receipts** remove what they cover from the sender's store.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tracing::warn;

use crate::error::{Error, Result};
use crate::identity::Fingerprint;
use crate::proto::durable::StreamId;
use crate::proto::durable::{Arrival, DurableFrame};
use crate::store::{Accepted, DurableStore, Stored};

/// Messages read from the store per batch when (re)sending.
const PUMP_BATCH: usize = 256;

/// RECEIPTs are sent at least once per this many messages taken in a row.
const RECEIPT_EVERY: usize = 64;

/// The error of a durable call on a node that keeps no store.
pub(crate) fn no_store() -> Error {
    Error::Config("durable messages need a store (NodeConfig::store)".into())
}

/// What the durable layer needs of a session (implemented by the session's outlet).
pub(crate) trait Link: Clone + Send + Sync + 'static {
    /// Sends a DURABLE frame on the reserved channel, waiting while the outbox is full.
    fn send_frame(&self, frame: Bytes) -> impl Future<Output = Result<()>> + Send;
    /// The next DURABLE frame received on this session, in order, if any.
    fn take_frame(&self) -> Option<Bytes>;
    /// Resolves when the session has ended.
    fn ended(&self) -> impl Future<Output = ()> + Send;
    /// Whether the session has ended.
    fn is_ended(&self) -> bool;
    /// Whether two handles are the same session.
    fn same(&self, other: &Self) -> bool;
    /// The peer broke the protocol: close the connection.
    fn violation(&self, reason: String);
    /// This node's store failed on a message the session already acknowledged: end the
    /// session, so that the peer sends everything not covered again on the next one.
    fn end_for_store(&self, error: Error);
    /// The receiving state of this session, made on first use.
    fn rx(&self) -> Arc<Rx>;
}

/// A session's receiving side: DATA frames queued for the committer, in order.
#[derive(Default)]
pub(crate) struct Rx {
    /// Held while frames are taken from the session, so they are queued in order.
    taking: Mutex<()>,
    queue: Mutex<VecDeque<Queued>>,
    /// Whether the task that waits for the queue's commits runs.
    running: AtomicBool,
    /// Whether a task waits for room in the store's inbox to take more.
    waiting_for_room: AtomicBool,
}

/// A DATA frame queued for the committer: its stream, and the future of the store's decision
/// (the message itself is handed over by the committer, see [`Durable::take`]).
type Queued = std::pin::Pin<Box<dyn Future<Output = (StreamId, Result<Accepted>)> + Send>>;

/// The node's durable layer.
pub(crate) struct Durable<L> {
    store: Arc<dyn DurableStore>,
    peers: Mutex<HashMap<Fingerprint, Peer<L>>>,
    /// Messages in the store's inbox not yet handed to the application, oldest first.
    ready: Mutex<VecDeque<Stored>>,
    arrived: Notify,
    closed: AtomicBool,
}

struct Peer<L> {
    /// Live sessions with the peer, oldest first: the newest one carries the stream.
    links: Vec<L>,
    wake: Arc<Notify>,
    /// How to dial the peer, learnt from the last session this node dialled to it.
    dial: Option<Dial>,
    /// The session the layer dialled itself, kept open while it is the one in use.
    owned: Option<Box<dyn std::any::Any + Send + Sync>>,
}

/// Dials a new session to a peer (the node's `connect` with the address and name of an earlier
/// session); what it returns keeps the session open. The session joins the layer through
/// [`Durable::attach`] as every session does.
pub(crate) type Dial = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<Box<dyn std::any::Any + Send + Sync>>> + Send>>
        + Send
        + Sync,
>;

/// First and longest wait between the layer's own dials to a peer with messages waiting.
const REDIAL_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));

impl<L: Link> Durable<L> {
    /// The durable layer over `store`: what its inbox holds is ready for the application.
    pub(crate) fn new(store: Arc<dyn DurableStore>) -> Result<Arc<Durable<L>>> {
        let limit = store.limits().inbox_messages;
        let ready: VecDeque<Stored> = store.inbox(None, limit).map_err(Error::Store)?.into();
        Ok(Arc::new(Durable {
            store,
            peers: Mutex::new(HashMap::new()),
            ready: Mutex::new(ready),
            arrived: Notify::new(),
            closed: AtomicBool::new(false),
        }))
    }

    pub(crate) fn store(&self) -> &Arc<dyn DurableStore> {
        &self.store
    }

    /// The node is closing: pumps stop, receivers wake.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for p in self.peers.lock().unwrap_or_else(|e| e.into_inner()).values() {
            p.wake.notify_one();
        }
        self.arrived.notify_waiters();
    }

    /// A session with `peer` started: it carries the peer's stream from now on (the newest
    /// does). `dial`, for a session this node dialled, is how to reach the peer again: when the
    /// peer's sessions are gone (it restarted, and answers a resumption with "unknown session")
    /// while messages wait, the layer dials a new session itself.
    pub(crate) fn attach(self: &Arc<Self>, peer: Fingerprint, link: L, dial: Option<Dial>) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let p = peers.entry(peer).or_insert_with(|| {
            let wake = Arc::new(Notify::new());
            tokio::spawn(pump(Arc::downgrade(self), peer, wake.clone()));
            Peer { links: Vec::new(), wake, dial: None, owned: None }
        });
        p.links.retain(|l| !l.is_ended());
        p.links.push(link);
        if dial.is_some() {
            p.dial = dial;
        }
        p.wake.notify_one();
    }

    /// With no session to `peer` and messages waiting for it: how to dial it, if known.
    fn dial_for(&self, peer: Fingerprint) -> Option<Dial> {
        let dial = self.peers.lock().unwrap_or_else(|e| e.into_inner()).get(&peer)?.dial.clone()?;
        let waiting = self.store.pending(peer, 0, 1).map(|p| !p.is_empty()).unwrap_or(false);
        waiting.then_some(dial)
    }

    /// Puts a message for `peer` in the store (durable when this returns) and has its pump send
    /// it. Returns the stored message (its stream and `dseq`).
    pub(crate) async fn send(
        self: &Arc<Self>,
        peer: Fingerprint,
        link: &L,
        channel: u16,
        payload: Bytes,
    ) -> Result<Stored> {
        let stored = self.store.append(peer, channel, payload).await.map_err(Error::Store)?;
        // The session the message was sent on may be the peer's first: attach it (once).
        let known = {
            let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            peers.get(&peer).map(|p| {
                p.wake.notify_one();
                p.links.iter().any(|l| l.same(link))
            })
        };
        if known != Some(true) {
            self.attach(peer, link.clone(), None);
        }
        Ok(stored)
    }

    /// The next durable message for the application, oldest first; waits for one.
    pub(crate) async fn recv(&self) -> Result<Stored> {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(m) = self.ready.lock().unwrap_or_else(|e| e.into_inner()).pop_front() {
                return Ok(m);
            }
            if self.closed.load(Ordering::SeqCst) {
                return Err(Error::Closed);
            }
            arrived.await;
        }
    }

    /// Takes the DURABLE frames `link` received from `peer`, in order (its channel reader calls
    /// this when one arrives).
    pub(crate) fn take(self: &Arc<Self>, peer: Fingerprint, link: &L) {
        let rx = link.rx();
        let mut queued_any = false;
        let mut stopped_for_room = false;
        {
            let _in_order = rx.taking.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if !self.store.has_room(false, 0) {
                    stopped_for_room = true;
                    break;
                }
                let Some(payload) = link.take_frame() else { break };
                match DurableFrame::decode(&payload) {
                    Err(e) => return link.violation(format!("malformed DURABLE frame: {e}")),
                    Ok(DurableFrame::Receipt { stream, dseq }) => {
                        let store = self.store.clone();
                        tokio::spawn(async move {
                            if let Err(e) = store.receipt(peer, stream, dseq).await {
                                warn!(error = %e, "could not record a durable receipt (the messages are sent again later)");
                            }
                        });
                    }
                    Ok(DurableFrame::Data { stream, dseq, channel, payload }) => {
                        // Handed to the application by the committer, in commit order.
                        let message = Stored { peer, stream, dseq, channel, payload };
                        let (this, handed) = (Arc::downgrade(self), message.clone());
                        let hand_over = Box::new(move |a: &Accepted| {
                            if let (Arrival::Next, Some(durable)) = (a.arrival, this.upgrade()) {
                                durable.deliver(handed);
                            }
                        });
                        let accepted = self.store.accept_in_order(message, hand_over);
                        let queued: Queued = Box::pin(async move { (stream, accepted.await.map_err(Error::Store)) });
                        rx.queue.lock().unwrap_or_else(|e| e.into_inner()).push_back(queued);
                        queued_any = true;
                    }
                }
            }
        }
        if queued_any && !rx.running.swap(true, Ordering::SeqCst) {
            tokio::spawn(settle(link.clone(), rx.clone()));
        }
        if stopped_for_room && !rx.waiting_for_room.swap(true, Ordering::SeqCst) {
            // Taken again once the application consumes something.
            let (this, link) = (self.clone(), link.clone());
            tokio::spawn(async move {
                // (The node's close ends its sessions, so `ended` covers it.)
                tokio::select! {
                    _ = this.store.wait_for_room(false, 0) => {}
                    _ = link.ended() => {}
                }
                link.rx().waiting_for_room.store(false, Ordering::SeqCst);
                if !link.is_ended() {
                    this.take(peer, &link);
                }
            });
        }
    }
}

/// Waits for a session's queued DATA frames to be committed, in order: new messages go to the
/// application, and RECEIPTs go back (after each run of frames, or every [`RECEIPT_EVERY`]).
async fn settle<L: Link>(link: L, rx: Arc<Rx>) {
    let mut since_receipt = 0;
    let mut owed: Option<(StreamId, u64)> = None;
    loop {
        let next = rx.queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
        let Some(next) = next else {
            send_receipt(&link, owed.take()).await;
            rx.running.store(false, Ordering::SeqCst);
            // A frame queued after the check above and before `running` was cleared is picked up
            // here (its taker saw `running` set and started nothing).
            if rx.queue.lock().unwrap_or_else(|e| e.into_inner()).is_empty() || rx.running.swap(true, Ordering::SeqCst)
            {
                return;
            }
            continue;
        };
        let (stream, accepted) = next.await;
        let accepted = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Not stored, and the session already acknowledged it: close the connection so
                // the peer's pump sends everything not covered again on the next session.
                warn!(error = %e, "durable store failed: ending the session");
                link.end_for_store(e);
                rx.queue.lock().unwrap_or_else(|e| e.into_inner()).clear();
                rx.running.store(false, Ordering::SeqCst);
                return;
            }
        };
        if let Arrival::Gap { expected } = accepted.arrival {
            warn!(?stream, expected, "durable message out of sequence dropped (the receiver's store lost the stream?)");
            continue;
        }
        owed = Some((stream, accepted.high));
        since_receipt += 1;
        if since_receipt >= RECEIPT_EVERY {
            since_receipt = 0;
            send_receipt(&link, owed.take()).await;
        }
    }
}

/// Sends the RECEIPT owed for a stream, if any (a session that ended takes nothing: the peer
/// sends those messages again on the next one, and gets its RECEIPT there).
async fn send_receipt<L: Link>(link: &L, owed: Option<(StreamId, u64)>) {
    if let Some((stream, dseq)) = owed {
        let _ = link.send_frame(DurableFrame::Receipt { stream, dseq }.to_bytes()).await;
    }
}

impl<L: Link> Durable<L> {
    /// A message was committed to the inbox: hand it to the application. Called by the store's
    /// committer in commit order, which is each stream's `dseq` order, whichever session
    /// delivered it (two sessions with one peer may deliver the same stream at once, after a
    /// restart; waiting for each session's commits in its own task once handed a message over
    /// before the one committed just before it, on the other session).
    fn deliver(&self, message: Stored) {
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).push_back(message);
        self.arrived.notify_waiters();
    }
}

/// Sends `peer`'s stream over its newest live session, in `dseq` order, from the store; starts
/// again from the oldest message not covered by a RECEIPT whenever that session changes (it
/// ended, or a newer one started: after a restart of either side, the older one may still be
/// trying to reconnect to a process that is gone).
async fn pump<L: Link>(durable: Weak<Durable<L>>, peer: Fingerprint, wake: Arc<Notify>) {
    loop {
        // Only one waiter registered at a time: `notify_one` wakes the oldest waiter, which must
        // be the one being polled.
        let mut backoff = REDIAL_BACKOFF.0;
        let link = loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match newest(&durable, peer) {
                None => return,
                Some(Some(link)) => break link,
                Some(None) => {
                    let dial = durable.upgrade().and_then(|d| d.dial_for(peer));
                    let Some(dial) = dial else {
                        notified.await;
                        continue;
                    };
                    // Messages wait and the peer's sessions are gone: dial it (the new session
                    // attaches itself), again and again with backoff, until a session is up.
                    match dial().await {
                        Ok(session) => {
                            backoff = REDIAL_BACKOFF.0;
                            let Some(d) = durable.upgrade() else { return };
                            if let Some(p) = d.peers.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&peer) {
                                p.owned = Some(session);
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "durable messages wait: dialling their peer again");
                            tokio::select! {
                                _ = tokio::time::sleep(backoff) => {}
                                _ = &mut notified => {}
                            }
                            backoff = (backoff * 2).min(REDIAL_BACKOFF.1);
                        }
                    }
                }
            }
        };
        // From the oldest message still in the store: what the last session did not get
        // covered is sent again (the receiver drops copies).
        let mut next = 0;
        'bound: loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let batch = {
                let Some(d) = durable.upgrade() else { return };
                if d.closed.load(Ordering::SeqCst) {
                    return;
                }
                d.store.pending(peer, next, PUMP_BATCH)
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "durable store unreadable: retrying in a second");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = &mut notified => {}
                    _ = link.ended() => {}
                }
                if !still_newest(&durable, peer, &link) {
                    break 'bound;
                }
                continue;
            }
            for m in batch {
                if !still_newest(&durable, peer, &link) {
                    break 'bound;
                }
                let frame =
                    DurableFrame::Data { stream: m.stream, dseq: m.dseq, channel: m.channel, payload: m.payload }
                        .to_bytes();
                // A full outbox waits; a newer session (or the end of this one) interrupts.
                let sent = tokio::select! {
                    r = link.send_frame(frame) => r.is_ok(),
                    _ = &mut notified => {
                        if !still_newest(&durable, peer, &link) {
                            break 'bound;
                        }
                        // Woken for a new message only: this frame is sent again below.
                        break;
                    }
                };
                if !sent {
                    break 'bound;
                }
                next = m.dseq + 1;
            }
        }
    }
}

/// The newest live session with `peer`: `None` if the layer is gone or closed (the pump ends),
/// `Some(None)` if there is no session.
fn newest<L: Link>(durable: &Weak<Durable<L>>, peer: Fingerprint) -> Option<Option<L>> {
    let d = durable.upgrade()?;
    if d.closed.load(Ordering::SeqCst) {
        return None;
    }
    let mut peers = d.peers.lock().unwrap_or_else(|e| e.into_inner());
    let p = peers.get_mut(&peer)?;
    p.links.retain(|l| !l.is_ended());
    Some(p.links.last().cloned())
}

/// Whether `link` is live and still the newest session with `peer`.
fn still_newest<L: Link>(durable: &Weak<Durable<L>>, peer: Fingerprint, link: &L) -> bool {
    !link.is_ended() && matches!(newest(durable, peer), Some(Some(l)) if l.same(link))
}
