//! A fault-injecting UDP link for tests, benchmarks and the demo: it forwards datagrams between
//! clients and one target, and loses, burst-loses, duplicates, delays (reorders), corrupts and
//! black-holes them on purpose. Seeded, so a run can be repeated; it reports what it did.
//!
//! The decisions are made by a pure, seeded [`Faults`] model (time is an argument); [`Proxy`] is
//! the thin async shell around it. Only loopback targets are accepted: this is a test tool.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use quicseal::netsim::{LinkConfig, Proxy};
//! let mut config = LinkConfig::default();
//! (config.loss, config.duplicate, config.reorder, config.corrupt) = (0.05, 0.05, 0.4, 0.02);
//! let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), "127.0.0.1:4433".parse().unwrap(), config).await?;
//! // dial proxy.local_addr() instead of 127.0.0.1:4433 ...
//! println!("{:?}", proxy.stats());
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Gilbert-Elliott burst loss: a two-state chain; every packet sent in the bad state is lost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BurstLoss {
    /// Chance per packet of moving from the good to the bad state.
    pub enter: f64,
    /// Chance per packet of leaving the bad state.
    pub exit: f64,
}

/// What the link does to each datagram, independently per direction. Probabilities are 0 to 1.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LinkConfig {
    /// Chance a datagram is lost.
    pub loss: f64,
    /// Burst losses on top of `loss`.
    pub burst: Option<BurstLoss>,
    /// Chance a datagram is sent twice.
    pub duplicate: f64,
    /// Chance a datagram is held back by an extra random delay up to `jitter` (reordering).
    pub reorder: f64,
    /// Delay added to every datagram.
    pub delay: Duration,
    /// Largest extra delay of a reordered datagram.
    pub jitter: Duration,
    /// Chance one byte of a datagram is flipped.
    pub corrupt: f64,
    /// Scheduled blackouts (everything dropped): (start after the proxy started, length).
    pub blackouts: Vec<(Duration, Duration)>,
    /// Seed of the random decisions.
    pub seed: u64,
}

impl Default for LinkConfig {
    /// A perfect link: no faults, no delay.
    fn default() -> Self {
        LinkConfig {
            loss: 0.0,
            burst: None,
            duplicate: 0.0,
            reorder: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::from_millis(20),
            corrupt: 0.0,
            blackouts: Vec::new(),
            seed: 1,
        }
    }
}

impl LinkConfig {
    /// Checks probabilities are within 0 to 1.
    pub fn validate(&self) -> Result<(), String> {
        let mut probs = vec![
            ("loss", self.loss),
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
            ("corrupt", self.corrupt),
        ];
        if let Some(b) = self.burst {
            probs.push(("burst enter", b.enter));
            probs.push(("burst exit", b.exit));
        }
        for (name, p) in probs {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name} must be between 0 and 1, got {p}"));
            }
        }
        Ok(())
    }
}

/// What the link did to one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Copies to deliver (0: dropped), each with its delay.
    pub copies: Vec<Duration>,
    /// Byte index to corrupt (modulo the datagram length) and the XOR mask, if any.
    pub corrupt: Option<(usize, u8)>,
    /// Why it was dropped, if it was.
    pub dropped: Option<DropReason>,
    /// How many copies were held back by an extra delay (reordering).
    pub reordered: usize,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Random loss.
    Loss,
    /// Burst loss.
    Burst,
    /// A blackout.
    Blackout,
}

/// The seeded fault model. Pure: same seed and inputs, same decisions.
#[derive(Debug, Clone)]
pub struct Faults {
    config: LinkConfig,
    rng: u64,
    in_burst: bool,
    manual_blackout: bool,
}

impl Faults {
    /// A model for `config`.
    pub fn new(config: LinkConfig) -> Faults {
        let rng = config.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        Faults { config, rng, in_burst: false, manual_blackout: false }
    }

    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.uniform() < p
    }

    /// Starts or ends a blackout by hand (on top of the scheduled ones).
    pub fn set_blackout(&mut self, on: bool) {
        self.manual_blackout = on;
    }

    /// Decides the fate of one datagram sent `elapsed` after the link started.
    pub fn decide(&mut self, elapsed: Duration) -> Decision {
        let dropped = |r| Decision { copies: Vec::new(), corrupt: None, dropped: Some(r), reordered: 0 };
        let blackout = self.manual_blackout
            || self.config.blackouts.iter().any(|&(start, len)| elapsed >= start && elapsed < start + len);
        if blackout {
            return dropped(DropReason::Blackout);
        }
        if let Some(b) = self.config.burst {
            let flip = if self.in_burst { b.exit } else { b.enter };
            if self.chance(flip) {
                self.in_burst = !self.in_burst;
            }
            if self.in_burst {
                return dropped(DropReason::Burst);
            }
        }
        if self.chance(self.config.loss) {
            return dropped(DropReason::Loss);
        }
        let n = if self.chance(self.config.duplicate) { 2 } else { 1 };
        let mut copies = Vec::with_capacity(n);
        let mut reordered = 0;
        for _ in 0..n {
            let mut d = self.config.delay;
            if self.chance(self.config.reorder) {
                d += self.config.jitter.mul_f64(self.uniform());
                reordered += 1;
            }
            copies.push(d);
        }
        let corrupt = if self.chance(self.config.corrupt) {
            Some(((self.uniform() * 65536.0) as usize, 1u8 << ((self.uniform() * 8.0) as u32).min(7)))
        } else {
            None
        };
        Decision { copies, corrupt, dropped: None, reordered }
    }
}

/// What a [`Proxy`] did, both directions together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetsimStats {
    /// Datagrams received from either side.
    pub received: u64,
    /// Datagrams sent on (copies included).
    pub forwarded: u64,
    /// Dropped by random loss.
    pub lost: u64,
    /// Dropped by burst loss.
    pub burst_lost: u64,
    /// Dropped during blackouts.
    pub blackout_lost: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Datagrams held back by an extra delay.
    pub reordered: u64,
    /// Datagrams with a flipped byte.
    pub corrupted: u64,
    /// Datagrams dropped because too many were waiting (the proxy's own bound).
    pub overflow: u64,
}

/// One line for an operator: `received 10, forwarded 9, lost 1, ...`.
impl std::fmt::Display for NetsimStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "received {}, forwarded {}, lost {} (random) + {} (burst) + {} (blackout), duplicated {}, reordered {}, \
             corrupted {}, dropped on overflow {}",
            self.received,
            self.forwarded,
            self.lost,
            self.burst_lost,
            self.blackout_lost,
            self.duplicated,
            self.reordered,
            self.corrupted,
            self.overflow
        )
    }
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    forwarded: AtomicU64,
    lost: AtomicU64,
    burst_lost: AtomicU64,
    blackout_lost: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    corrupted: AtomicU64,
    overflow: AtomicU64,
}

/// Most datagrams waiting in delays at once; beyond it they are dropped and counted.
const MAX_DELAYED: u64 = 65_536;
/// Most clients with an upstream socket at once; a new client beyond it takes the place of the
/// one heard from least recently (a restarted process comes back from a new port: the old one
/// is gone).
pub const MAX_CLIENTS: usize = 64;

/// A running fault-injecting UDP proxy. Stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    local: SocketAddr,
    counters: Arc<Counters>,
    faults: Arc<std::sync::Mutex<Faults>>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct ProxyShared {
    listen: Arc<UdpSocket>,
    target: SocketAddr,
    counters: Arc<Counters>,
    faults: Arc<std::sync::Mutex<Faults>>,
    started: Instant,
    delayed: AtomicU64,
}

impl Proxy {
    /// Listens on `listen` and forwards to `target`, which must be a loopback address.
    pub async fn start(listen: SocketAddr, target: SocketAddr, config: LinkConfig) -> io::Result<Proxy> {
        if !target.ip().is_loopback() || !listen.ip().is_loopback() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "netsim only forwards between loopback addresses"));
        }
        config.validate().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let socket = Arc::new(UdpSocket::bind(listen).await?);
        let local = socket.local_addr()?;
        let counters = Arc::new(Counters::default());
        let faults = Arc::new(std::sync::Mutex::new(Faults::new(config)));
        let shared = Arc::new(ProxyShared {
            listen: socket,
            target,
            counters: counters.clone(),
            faults: faults.clone(),
            started: Instant::now(),
            delayed: AtomicU64::new(0),
        });
        let task = tokio::spawn(run(shared));
        Ok(Proxy { local, counters, faults, task })
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Starts or ends a blackout now (everything dropped both ways while on).
    pub fn set_blackout(&self, on: bool) {
        self.faults.lock().unwrap_or_else(|e| e.into_inner()).set_blackout(on);
    }

    /// Replaces the fault model from now on (a new seed sequence; a manual blackout stays).
    pub fn reconfigure(&self, config: LinkConfig) -> Result<(), String> {
        config.validate()?;
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let blackout = faults.manual_blackout;
        *faults = Faults::new(config);
        faults.manual_blackout = blackout;
        Ok(())
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> NetsimStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetsimStats {
            received: l(&c.received),
            forwarded: l(&c.forwarded),
            lost: l(&c.lost),
            burst_lost: l(&c.burst_lost),
            blackout_lost: l(&c.blackout_lost),
            duplicated: l(&c.duplicated),
            reordered: l(&c.reordered),
            corrupted: l(&c.corrupted),
            overflow: l(&c.overflow),
        }
    }
}

/// Client-side loop: datagrams from clients go to the target through one upstream socket per
/// client; each upstream socket's replies go back to its client.
async fn run(shared: Arc<ProxyShared>) {
    // Per client: its upstream socket, its reply loop, and when it last sent (a count of
    // datagrams, which orders clients by recency).
    let mut upstream: HashMap<SocketAddr, (Arc<UdpSocket>, tokio::task::AbortHandle, u64)> = HashMap::new();
    // Reply loops live in this set, so they end when this task is aborted (Proxy dropped).
    let mut replies = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; 65_536];
    let mut clock = 0u64;
    loop {
        let Ok((n, client)) = shared.listen.recv_from(&mut buf).await else { return };
        clock += 1;
        // Finished reply loops are collected, so the set stays bounded too.
        while replies.try_join_next().is_some() {}
        let up = match upstream.get_mut(&client) {
            Some((u, _, last)) => {
                *last = clock;
                u.clone()
            }
            None => {
                if upstream.len() >= MAX_CLIENTS
                    && let Some(&oldest) = upstream.iter().min_by_key(|(_, (_, _, last))| *last).map(|(a, _)| a)
                    && let Some((_, reply, _)) = upstream.remove(&oldest)
                {
                    reply.abort();
                }
                let Ok(sock) = UdpSocket::bind("127.0.0.1:0").await else { continue };
                let sock = Arc::new(sock);
                let reply = replies.spawn(reply_loop(shared.clone(), sock.clone(), client));
                upstream.insert(client, (sock.clone(), reply, clock));
                sock
            }
        };
        forward(&shared, &buf[..n], up, shared.target);
    }
}

async fn reply_loop(shared: Arc<ProxyShared>, up: Arc<UdpSocket>, client: SocketAddr) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, from)) = up.recv_from(&mut buf).await else { return };
        if from != shared.target {
            continue;
        }
        forward(&shared, &buf[..n], shared.listen.clone(), client);
    }
}

/// Applies the fault model to one datagram and sends what survives from `via` to `to`.
fn forward(shared: &Arc<ProxyShared>, datagram: &[u8], via: Arc<UdpSocket>, to: SocketAddr) {
    let c = &shared.counters;
    c.received.fetch_add(1, Ordering::Relaxed);
    let decision = shared.faults.lock().unwrap_or_else(|e| e.into_inner()).decide(shared.started.elapsed());
    if let Some(reason) = decision.dropped {
        let counter = match reason {
            DropReason::Loss => &c.lost,
            DropReason::Burst => &c.burst_lost,
            DropReason::Blackout => &c.blackout_lost,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut bytes = datagram.to_vec();
    if let Some((i, mask)) = decision.corrupt
        && !bytes.is_empty()
    {
        let i = i % bytes.len();
        bytes[i] ^= mask;
        c.corrupted.fetch_add(1, Ordering::Relaxed);
    }
    if decision.copies.len() > 1 {
        c.duplicated.fetch_add(decision.copies.len() as u64 - 1, Ordering::Relaxed);
    }
    c.reordered.fetch_add(decision.reordered as u64, Ordering::Relaxed);
    for delay in decision.copies {
        if delay.is_zero() {
            // A socket the reactor has not seen writable yet (a new client's upstream socket)
            // refuses a try; that datagram goes out as soon as it can instead of being lost.
            if let Err(e) = via.try_send_to(&bytes, to)
                && e.kind() == io::ErrorKind::WouldBlock
            {
                let (via, bytes) = (via.clone(), bytes.clone());
                tokio::spawn(async move { via.send_to(&bytes, to).await });
            }
            c.forwarded.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if shared.delayed.fetch_add(1, Ordering::Relaxed) >= MAX_DELAYED {
            shared.delayed.fetch_sub(1, Ordering::Relaxed);
            c.overflow.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let (via, bytes, shared) = (via.clone(), bytes.clone(), shared.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = via.send_to(&bytes, to).await;
            shared.counters.forwarded.fetch_add(1, Ordering::Relaxed);
            shared.delayed.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_seeded_and_rates_match() {
        let cfg =
            LinkConfig { loss: 0.05, duplicate: 0.05, reorder: 0.4, corrupt: 0.02, seed: 42, ..LinkConfig::default() };
        let run = |cfg: &LinkConfig| {
            let mut f = Faults::new(cfg.clone());
            (0..100_000).map(|i| f.decide(Duration::from_millis(i))).collect::<Vec<_>>()
        };
        let a = run(&cfg);
        assert_eq!(a, run(&cfg), "same seed, same decisions");
        assert_ne!(a, run(&LinkConfig { seed: 43, ..cfg.clone() }));
        let lost = a.iter().filter(|d| d.dropped == Some(DropReason::Loss)).count() as f64 / 1e5;
        let dup = a.iter().filter(|d| d.copies.len() == 2).count() as f64 / 1e5;
        let corrupt = a.iter().filter(|d| d.corrupt.is_some()).count() as f64 / 1e5;
        let delayed = a.iter().map(|d| d.reordered).sum::<usize>() as f64 / 1e5;
        assert!((lost - 0.05).abs() < 0.005, "{lost}");
        assert!((dup - 0.95 * 0.05).abs() < 0.005, "{dup}");
        assert!((corrupt - 0.95 * 0.02).abs() < 0.003, "{corrupt}");
        assert!((delayed - 0.95 * 1.05 * 0.4).abs() < 0.01, "{delayed}");
    }

    #[test]
    fn blackouts_and_bursts() {
        let cfg = LinkConfig {
            blackouts: vec![(Duration::from_secs(1), Duration::from_secs(2))],
            burst: Some(BurstLoss { enter: 0.01, exit: 0.2 }),
            ..LinkConfig::default()
        };
        let mut f = Faults::new(cfg);
        assert_eq!(f.decide(Duration::from_millis(1500)).dropped, Some(DropReason::Blackout));
        assert_eq!(f.decide(Duration::from_millis(2999)).dropped, Some(DropReason::Blackout));
        let after: Vec<_> = (0..100_000).map(|_| f.decide(Duration::from_secs(3))).collect();
        let burst = after.iter().filter(|d| d.dropped == Some(DropReason::Burst)).count() as f64 / 1e5;
        // Stationary share of the bad state: enter / (enter + exit) = 0.01 / 0.21.
        assert!((burst - 0.01 / 0.21).abs() < 0.01, "{burst}");
        f.set_blackout(true);
        assert_eq!(f.decide(Duration::from_secs(9)).dropped, Some(DropReason::Blackout));
        assert!(LinkConfig { loss: 1.5, ..LinkConfig::default() }.validate().is_err());
    }
}
