//! Soak test: many messages of mixed sizes on 4 channels through the netsim link at 5% loss,
//! 5% duplication, 40% reordering and 2% corruption, with forced reconnects (killed
//! connections) and blackouts. Zero lost, zero duplicated, order kept, all acknowledged; and the
//! faults bite: copies of messages reached the session (counted below the application, in
//! `duplicates_dropped`) and were dropped there.
//!
//! Default: 100,000 messages, 24 reconnects. `QUICSEAL_SOAK_LONG=1`: 1,000,000 messages, 60
//! reconnects.

use std::time::{Duration, Instant};

use crate::common::*;
use quicseal::netsim::{LinkConfig, Proxy};
use quicseal::{Limits, NodeConfig, SessionEvent};

struct Plan {
    messages: u32,
    forced: u32,
    blackouts: u32,
}

fn plan() -> Plan {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok());
    if let Some(messages) = var("QUICSEAL_SOAK_MESSAGES") {
        return Plan {
            messages,
            forced: var("QUICSEAL_SOAK_FORCED").unwrap_or(16),
            blackouts: var("QUICSEAL_SOAK_BLACKOUTS").unwrap_or(8),
        };
    }
    if std::env::var_os("QUICSEAL_SOAK_LONG").is_some() {
        Plan { messages: 1_000_000, forced: 40, blackouts: 20 }
    } else {
        Plan { messages: 100_000, forced: 16, blackouts: 8 }
    }
}

/// Size of message `i`: mostly small, some medium, a few up to 64 KiB (deterministic). The
/// mean is about 700 bytes, so a run moves some 70 MB.
fn size_of(i: u32) -> usize {
    let x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
    match x % 200 {
        0 => 16 * 1024 + (x as usize * 7) % (48 * 1024 + 1), // 0.5%: 16 KiB to 64 KiB
        1..=9 => 1024 + (x as usize * 13) % (15 * 1024),     // 4.5%: 1 to 16 KiB
        _ => 16 + (x as usize * 31) % 185,                   // 95%: 16 to 200 B
    }
}

/// Payload of message `i`: its index, then a pattern that depends on it.
fn payload(i: u32) -> Vec<u8> {
    let mut p = vec![0u8; size_of(i)];
    p[..4].copy_from_slice(&i.to_be_bytes());
    for (k, b) in p[4..].iter_mut().enumerate() {
        *b = (i as usize).wrapping_add(k) as u8;
    }
    p
}

fn soak_limits() -> Limits {
    let mut l = Limits::default();
    l.idle_timeout = Duration::from_millis(800);
    l.keep_alive = Some(Duration::from_millis(200));
    l.reconnect_backoff = (Duration::from_millis(20), Duration::from_millis(300));
    l.resume_timeout = Duration::from_secs(60);
    l.handshake_timeout = Duration::from_secs(20);
    l
}

fn faults() -> LinkConfig {
    lossy_link(Duration::from_millis(1), 2026)
}

struct Outcome {
    delivered: u64,
    duplicates_seen: u64,
    out_of_order: u64,
    reconnects: u64,
    retransmissions: u64,
    duplicates_dropped: u64,
    acked: u64,
    proxy: quicseal::netsim::NetsimStats,
    elapsed: Duration,
}

async fn run(plan: &Plan) -> Outcome {
    let started = Instant::now();
    let pki = Pki::new("soak ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()).limits(soak_limits()));
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()).limits(soak_limits()));
    let (proxy, to_server, at_server) = connect_via_proxy(&client, &server, "server").await;
    proxy.reconfigure(faults()).unwrap();

    let n = plan.messages;
    let disruptions = plan.forced + plan.blackouts;
    let every = n / (disruptions + 1);
    let sender = tokio::spawn({
        let session = to_server.clone();
        let proxy_handle = ProxyHandle(std::sync::Arc::new(proxy));
        let (forced, blackouts) = (plan.forced, plan.blackouts);
        async move {
            let mut events = session.events();
            let (mut f, mut b) = (0, 0);
            for i in 0..n {
                session.send_bytes((i % 4) as u16, payload(i)).await.unwrap();
                if i > 0 && i % every == 0 && f + b < forced + blackouts {
                    // Alternate killed connections and blackouts.
                    if (f < forced && f <= b * 2) || b >= blackouts {
                        session.force_reconnect();
                        f += 1;
                    } else {
                        proxy_handle.0.set_blackout(true);
                        wait_for(&mut events, |e| matches!(e, SessionEvent::Reconnecting { .. })).await;
                        proxy_handle.0.set_blackout(false);
                        b += 1;
                    }
                    wait_for(&mut events, |e| *e == SessionEvent::Resumed).await;
                }
            }
            for ch in 0..4 {
                session.delivered(ch).await.unwrap();
            }
            proxy_handle
        }
    });

    let mut next = [0u32, 1, 2, 3];
    let mut seen = vec![false; n as usize];
    let (mut delivered, mut duplicates_seen, mut out_of_order) = (0u64, 0u64, 0u64);
    let quiet_after_all = Duration::from_millis(300);
    loop {
        let limit = if delivered >= u64::from(n) { quiet_after_all } else { Duration::from_secs(60) };
        let Ok(m) = tokio::time::timeout(limit, at_server.recv()).await else { break };
        let m = m.unwrap();
        let p = m.payload();
        let i = u32::from_be_bytes(p[..4].try_into().unwrap());
        assert_eq!(p.len(), size_of(i));
        assert!(p[4..].iter().enumerate().all(|(k, b)| *b == (i as usize).wrapping_add(k) as u8), "payload {i} intact");
        let ch = m.channel() as usize;
        assert_eq!(i as usize % 4, ch);
        if seen[i as usize] {
            duplicates_seen += 1;
            continue;
        }
        seen[i as usize] = true;
        delivered += 1;
        if i != next[ch] {
            out_of_order += 1;
        }
        next[ch] = i.max(next[ch]) + 4;
    }
    let proxy = tokio::time::timeout(Duration::from_secs(60), sender).await.expect("sender finished").unwrap();
    let c = to_server.stats();
    let s = at_server.stats();
    assert!(seen.iter().all(|s| *s), "every message delivered");
    Outcome {
        delivered,
        duplicates_seen,
        out_of_order,
        reconnects: c.reconnects,
        retransmissions: c.retransmissions,
        duplicates_dropped: s.duplicates_dropped,
        acked: c.acked,
        proxy: proxy.0.stats(),
        elapsed: started.elapsed(),
    }
}

/// Lets the sender task own the proxy and hand it back.
struct ProxyHandle(std::sync::Arc<Proxy>);

async fn wait_for(events: &mut tokio::sync::broadcast::Receiver<SessionEvent>, want: impl Fn(&SessionEvent) -> bool) {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(60), events.recv()).await.expect("event in time");
        match e {
            Ok(e) if want(&e) => return,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_exactly_once_in_order_through_faults_and_reconnects() {
    let plan = plan();
    let o = run(&plan).await;
    println!(
        "soak: {} messages in {:.1?}: delivered {}, duplicates seen 0 (dropped {}), reconnects {}, retransmissions {}, acked {}; link {:?}",
        plan.messages, o.elapsed, o.delivered, o.duplicates_dropped, o.reconnects, o.retransmissions, o.acked, o.proxy
    );
    assert_eq!(o.delivered, u64::from(plan.messages), "nothing lost");
    assert_eq!(o.duplicates_seen, 0, "nothing delivered twice");
    assert_eq!(o.out_of_order, 0, "order kept per channel");
    assert_eq!(o.acked, u64::from(plan.messages), "everything acknowledged");
    assert!(o.reconnects >= u64::from(plan.forced + plan.blackouts), "{} reconnects", o.reconnects);
    // The faults bite: copies of messages reached the session and were dropped below the
    // application (the zero above is de-duplication at work, not a quiet network).
    assert!(o.duplicates_dropped > 0, "the faults must produce copies: {}", o.duplicates_dropped);
    let p = o.proxy;
    assert!(p.lost > 0 && p.duplicated > 0 && p.reordered > 0 && p.corrupted > 0 && p.blackout_lost > 0, "{p:?}");
}
