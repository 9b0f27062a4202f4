//! Counters: what a session or a node sent, delivered and refused.
//!
//! Read them as a [`Stats`] snapshot ([`Session::stats`](crate::Session::stats),
//! [`Node::stats`](crate::Node::stats)); every refusal is also a `tracing` event (target
//! `quicseal::reject`, level debug) and every session end logs its totals (level info).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    (
        counters { $($(#[doc = $doc:literal])* $name:ident,)* }
        gauges { $($(#[doc = $gdoc:literal])* $gauge:ident,)* }
    ) => {
        /// A snapshot of counters (totals since the start) and gauges (current values, filled in
        /// by [`Session::stats`](crate::Session::stats) only).
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Stats {
            $($(#[doc = $doc])* pub $name: u64,)*
            $($(#[doc = $gdoc])* pub $gauge: u64,)*
        }

        impl Stats {
            /// Every counter and gauge by its field name, in declaration order: what
            /// [`Display`](std::fmt::Display) prints and what the `metrics` export names.
            pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
                [$((stringify!($name), self.$name),)* $((stringify!($gauge), self.$gauge),)*].into_iter()
            }

            /// Whether a name from [`Stats::iter`] is a gauge (a current value) rather than a
            /// counter (a total since the start).
            pub fn is_gauge(name: &str) -> bool {
                [$(stringify!($gauge),)*].contains(&name)
            }
        }

        /// Live counters (atomics), shared by a session's tasks.
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $($name: AtomicU64,)*
        }

        impl Counters {
            pub(crate) fn bump(&self, c: Counter) {
                self.get(c).fetch_add(1, Ordering::Relaxed);
            }

            pub(crate) fn snapshot(&self) -> Stats {
                Stats { $($name: self.$name.load(Ordering::Relaxed),)* ..Stats::default() }
            }
        }

        /// Which counter to bump.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[allow(non_camel_case_types)]
        pub(crate) enum Counter {
            $($name,)*
        }

        impl Counters {
            fn get(&self, c: Counter) -> &AtomicU64 {
                match c {
                    $(Counter::$name => &self.$name,)*
                }
            }
        }
    };
}

counters! {
    counters {
    /// Messages sent on channels.
    messages_sent,
    /// Payload bytes sent on channels.
    bytes_sent,
    /// Messages handed to the application (channels and datagrams).
    messages_delivered,
    /// Payload bytes handed to the application.
    bytes_delivered,
    /// Datagrams sent.
    datagrams_sent,
    /// Datagrams handed to the application (also counted in `messages_delivered`).
    datagrams_delivered,
    /// Messages whose integrity tag did not verify.
    tag_failures,
    /// Messages refused as replays: seen before, older than the window, behind the stream's
    /// order, or from another epoch.
    replays_rejected,
    /// Messages refused as too old or too far in the future.
    stale_rejected,
    /// Malformed frames (each closes its connection).
    malformed_frames,
    /// Datagrams dropped on receipt: refused by a check above, no room in the receive buffer,
    /// or too many datagram channels.
    datagrams_dropped,
    /// Channel messages sent again (not yet acknowledged after a timeout or a reconnect).
    retransmissions,
    /// Copies of channel messages already received, dropped.
    duplicates_dropped,
    /// Channel messages the receiving side dropped before recording them, for lack of room
    /// behind a gap or too far ahead of what it delivered (the sender resends them).
    inbox_dropped,
    /// Channel messages the peer's application acknowledged.
    acked,
    /// ACK frames sent (each acknowledges what one channel's application has taken).
    acks_sent,
    /// Times a session moved to a new connection after losing one.
    reconnects,
    /// Times a session moved to a new connection on purpose, for fresh message keys: a key
    /// reached half its usage limit, or a resend would have been older than half the freshness
    /// horizon (also counted in `reconnects` once resumed).
    rekeys,
    /// Incoming handshakes refused before they started: too many handshakes in progress (in
    /// all, or from one address) or too many incoming connections (node counters only).
    handshakes_refused,
    /// QUIC Retry packets sent to validate a peer's address while handshakes piled up (node
    /// counters only).
    retries_sent,
    /// RPC calls this side made (each attempt).
    rpc_calls,
    /// RPC requests received from the peer.
    rpc_requests,
    /// RPC handlers started.
    rpc_handled,
    /// RPC requests answered from the at-most-once cache, or joined to the same call still
    /// running, without running the handler again.
    rpc_cache_hits,
    /// Finished RPC calls the cache forgot before its horizon because it was over its bounds.
    rpc_cache_evictions,
    /// RPC requests refused because a concurrency limit or the cache was full.
    rpc_overloaded,
    /// RPC calls the caller cancelled while their handler ran.
    rpc_cancelled,
    /// RPC handlers still running at their deadline (no longer waited for).
    rpc_deadline_exceeded,
    /// RPC handlers that panicked.
    rpc_panics,
    /// RPC responses that arrived after their caller stopped waiting (dropped).
    rpc_late_responses,
    }
    gauges {
    /// Channel messages sent and not yet acknowledged.
    in_flight_messages,
    /// Payload bytes sent and not yet acknowledged.
    in_flight_bytes,
    /// Smoothed round-trip time of end-to-end acknowledgements, ms (0 before the first).
    rtt_ms,
    }
}

/// One line, `name=value` for every counter and gauge that is not zero (`all zero` when none
/// is), in the order of [`Stats::iter`].
impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for (name, value) in self.iter().filter(|(_, v)| *v != 0) {
            write!(f, "{}{name}={value}", if first { "" } else { " " })?;
            first = false;
        }
        if first {
            f.write_str("all zero")?;
        }
        Ok(())
    }
}

/// Bumps a session's counters and its node's together.
#[derive(Debug, Clone)]
pub(crate) struct Tally {
    pub(crate) session: Arc<Counters>,
    pub(crate) node: Arc<Counters>,
}

impl Tally {
    /// Counters of their own (a session core outside a node).
    pub(crate) fn standalone() -> Tally {
        Tally { session: Arc::new(Counters::default()), node: Arc::new(Counters::default()) }
    }

    pub(crate) fn add(&self, c: Counter, n: u64) {
        self.session.get(c).fetch_add(n, Ordering::Relaxed);
        self.node.get(c).fetch_add(n, Ordering::Relaxed);
    }
}
