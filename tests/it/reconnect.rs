//! Sessions that survive the loss of their connection: forced reconnects, blackouts through the
//! netsim link, giving up, and a peer that no longer knows the session.

use std::time::Duration;

use crate::common::*;
use futures_util::FutureExt;
use quicseal::netsim::{LinkConfig, Proxy};
use quicseal::{Error, Limits, NodeConfig, Session, SessionEvent};

fn quick_limits() -> Limits {
    let mut l = Limits::default();
    l.idle_timeout = Duration::from_millis(800);
    l.keep_alive = Some(Duration::from_millis(200));
    l.reconnect_backoff = (Duration::from_millis(20), Duration::from_millis(200));
    l.resume_timeout = Duration::from_secs(10);
    l
}

async fn wait_resumed(events: &mut tokio::sync::broadcast::Receiver<SessionEvent>) {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("resumed in time").unwrap();
        if e == SessionEvent::Resumed {
            return;
        }
    }
}

/// Receives `n` messages and checks each channel's numbers arrive in order, exactly once.
async fn receive_in_order(session: &Session, n: usize, channels: u16) {
    let mut next = vec![0u32; channels as usize];
    for _ in 0..n {
        let m = tokio::time::timeout(Duration::from_secs(30), session.recv()).await.expect("a message");
        let m = m.unwrap_or_else(|e| panic!("session ended: {e} {:?}", session.stats()));
        let ch = m.channel() as usize;
        let v: u32 = m.decode().unwrap();
        assert_eq!(v, next[ch], "channel {ch}: out of order or duplicated");
        next[ch] += 1;
    }
}

#[tokio::test]
async fn forced_reconnects_lose_and_duplicate_nothing() {
    let pki = Pki::new("ca");
    let (_a, _b, ab, ba) = session_pair(&pki, quick_limits(), quick_limits()).await;
    let epoch = ab.epoch();
    const N: u32 = 3000;
    let sender = tokio::spawn({
        let ab = ab.clone();
        async move {
            let mut events = ab.events();
            for i in 0..N {
                ab.send((i % 4) as u16, &(i / 4)).await.unwrap();
                if i % 300 == 150 {
                    ab.force_reconnect();
                    wait_resumed(&mut events).await;
                }
            }
            for ch in 0..4 {
                ab.delivered(ch).await.unwrap();
            }
        }
    });
    receive_in_order(&ba, N as usize, 4).await;
    tokio::time::timeout(Duration::from_secs(30), sender).await.unwrap().unwrap();
    let s = ab.stats();
    assert_eq!(s.reconnects, 10, "{s:?}");
    assert_eq!(s.acked, u64::from(N));
    assert_eq!(ab.epoch(), epoch, "the session keeps its epoch across connections");
    assert_eq!(ba.stats().messages_delivered, u64::from(N));
    assert_eq!(ba.stats().reconnects, 10);
    // Acknowledgements cover several messages each (and at least one ACK frame per channel).
    let acks = ba.stats().acks_sent;
    assert!((4..u64::from(N)).contains(&acks), "{acks} ACK frames for {N} messages");
    assert_eq!(ab.stats().acks_sent, 0, "the sender received nothing to acknowledge");
    // Still one session on each side, still working.
    ba.send(0, &7u32).await.unwrap();
    assert_eq!(ab.recv().await.unwrap().decode::<u32>().unwrap(), 7);
}

#[tokio::test]
async fn the_accepting_side_can_force_a_reconnect_too() {
    let pki = Pki::new("ca");
    let (_a, _b, ab, ba) = session_pair(&pki, quick_limits(), quick_limits()).await;
    let mut events = ba.events();
    for i in 0..200u32 {
        ba.send(1, &i).await.unwrap();
        if i == 50 || i == 120 {
            ba.force_reconnect();
            wait_resumed(&mut events).await;
        }
    }
    let mut next = 0u32;
    while next < 200 {
        let m = tokio::time::timeout(Duration::from_secs(20), ab.recv()).await.unwrap().unwrap();
        assert_eq!(m.decode::<u32>().unwrap(), next);
        next += 1;
    }
    ba.delivered(1).await.unwrap();
    assert_eq!(ba.stats().reconnects, 2);
}

#[tokio::test]
async fn a_blackout_is_survived_when_the_link_comes_back() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()).limits(quick_limits()));
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()).limits(quick_limits()));
    let (proxy, to_server, at_server) = connect_via_proxy(&client, &server, "server").await;
    let mut events = to_server.events();
    for i in 0..100u32 {
        to_server.send(0, &i).await.unwrap();
    }
    proxy.set_blackout(true);
    for i in 100..200u32 {
        to_server.send(0, &i).await.unwrap(); // queued while the link is dark
    }
    // Wait until the client noticed and started reconnecting, then bring the link back.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await.unwrap().unwrap() {
            SessionEvent::Reconnecting { .. } => break,
            _ => continue,
        }
    }
    proxy.set_blackout(false);
    receive_in_order(&at_server, 200, 1).await;
    to_server.delivered(0).await.unwrap();
    assert!(to_server.stats().reconnects >= 1);
}

#[tokio::test]
async fn resuming_a_session_the_peer_forgot_gives_up_at_once() {
    let pki = Pki::new("ca");
    let server_id = pki.identity("server");
    let server = bind(NodeConfig::new(server_id.clone(), pki.trust()).limits(quick_limits()));
    let addr = server.local_addr().unwrap();
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()).limits(quick_limits()));
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), addr, LinkConfig::default()).await.unwrap();
    let (to_server, at_server) = tokio::join!(client.connect(proxy.local_addr(), "server"), server.accept());
    let (to_server, at_server) = (to_server.unwrap(), at_server.unwrap());
    let mut events = to_server.events();
    // The server crashes (its goodbye is lost in a blackout) and restarts on the same address
    // with no memory of the session.
    proxy.set_blackout(true);
    drop(at_server);
    drop(server);
    let restarted = bind_again(addr, || NodeConfig::new(server_id.clone(), pki.trust()).limits(quick_limits())).await;
    proxy.set_blackout(false);
    let e = tokio::time::timeout(Duration::from_secs(10), to_server.closed()).await.unwrap();
    assert!(
        matches!(
            e,
            Error::ProtocolViolation {
                side: quicseal::Side::Remote,
                violation: quicseal::Violation::UnknownSession(None)
            }
        ),
        "refused, not timed out: {e:?}"
    );
    let mut gave_up = false;
    while let Ok(ev) = events.try_recv() {
        gave_up |= matches!(ev, SessionEvent::GaveUp { .. });
    }
    assert!(gave_up);
    let refused = tokio::time::timeout(Duration::from_secs(5), restarted.accept()).await.unwrap().unwrap_err();
    assert!(
        matches!(
            refused,
            Error::ProtocolViolation {
                side: quicseal::Side::Local,
                violation: quicseal::Violation::UnknownSession(Some(_))
            }
        ),
        "{refused:?}"
    );
}

#[tokio::test]
async fn manual_ack_mode_acknowledges_only_what_the_application_acked() {
    let pki = Pki::new("ca");
    let a = bind(NodeConfig::new(pki.identity("a"), pki.trust()).limits(quick_limits()));
    let b = bind(NodeConfig::new(pki.identity("b"), pki.trust()).limits(quick_limits()).manual_ack(true));
    let (ab, ba) = connect(&a, &b, "b").await;
    let (ab, ba) = (ab.unwrap(), ba.unwrap());
    let s1 = ab.send(0, &1u32).await.unwrap();
    let s2 = ab.send(0, &2u32).await.unwrap();
    let m1 = ba.recv().await.unwrap();
    let m2 = ba.recv().await.unwrap();
    // Out of order: 2 first (a selective range), then 1. ACK frames travel in order on the
    // control stream and each states everything acknowledged so far, so once 2's receipt is in,
    // a receipt for 1 would already be too if the receiver had (wrongly) sent one. (That no
    // receipt comes at all before the application acknowledges, however long the sender waits,
    // is checked on a simulated clock: `proto::session` tests, manual-ack scenario.)
    assert!(ba.ack(&m2));
    tokio::time::timeout(Duration::from_secs(5), ab.wait_acked(0, s2)).await.unwrap().unwrap();
    assert!(ab.wait_acked(0, s1).now_or_never().is_none(), "1 is not acked yet");
    assert!(ab.delivered(0).now_or_never().is_none(), "1 is not acked yet");
    assert!(ba.ack(&m1));
    assert!(!ba.ack(&m1), "idempotent");
    tokio::time::timeout(Duration::from_secs(5), ab.delivered(0)).await.unwrap().unwrap();
    assert_eq!(ab.stats().acked, 2);
}

/// `recv_many` waits for a first message, then takes what is ready up to its limit, in each
/// channel's order; the batch is acknowledged as `recv` would (at once, or by `ack` in manual
/// mode), and it ends with the session's error.
#[tokio::test]
async fn recv_many_takes_every_ready_message_up_to_its_limit() {
    let pki = Pki::new("ca");
    for manual in [false, true] {
        let a = bind(NodeConfig::new(pki.identity("a"), pki.trust()).limits(quick_limits()));
        let b = bind(NodeConfig::new(pki.identity("b"), pki.trust()).limits(quick_limits()).manual_ack(manual));
        let (ab, ba) = connect(&a, &b, "b").await;
        let (ab, ba) = (ab.unwrap(), ba.unwrap());
        let mut got = Vec::new();
        assert_eq!(ba.recv_many(&mut got, 0).now_or_never().unwrap().unwrap(), 0, "limit 0: nothing, no wait");
        assert!(ba.recv_many(&mut got, 8).now_or_never().is_none(), "nothing ready: it waits");
        // 5 messages on each of channels 0 and 1, all received before the first call.
        for i in 0..10u32 {
            ab.send_bytes((i % 2) as u16, i.to_be_bytes().to_vec()).await.unwrap();
        }
        eventually("all ten are buffered at b", || b.buffered_bytes() == 40).await;
        assert_eq!(ba.recv_many(&mut got, 4).await.unwrap(), 4);
        assert_eq!(ba.recv_many(&mut got, 100).await.unwrap(), 6, "every ready one, in one call");
        assert_eq!(got.len(), 10);
        for channel in [0, 1] {
            let seqs: Vec<u64> = got.iter().filter(|m| m.channel() == channel).map(|m| m.seq()).collect();
            assert_eq!(seqs, (1..=5).collect::<Vec<u64>>(), "channel {channel}: each once, in order");
        }
        if manual {
            assert!(ab.delivered(0).now_or_never().is_none(), "manual mode: nothing acked before `ack`");
            for m in &got {
                assert!(ba.ack(m));
            }
        }
        tokio::time::timeout(Duration::from_secs(5), ab.delivered(0)).await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_secs(5), ab.delivered(1)).await.unwrap().unwrap();
        ab.close();
        let end = tokio::time::timeout(Duration::from_secs(5), ba.recv_many(&mut got, 8)).await.unwrap();
        assert!(matches!(end, Err(Error::ConnectionLost { .. } | Error::Closed)), "{end:?}");
    }
}

#[tokio::test]
async fn a_full_outbox_makes_try_send_fail_and_send_wait() {
    let pki = Pki::new("ca");
    let mut limits = quick_limits();
    limits.outbox_messages = 4;
    let a = bind(NodeConfig::new(pki.identity("a"), pki.trust()).limits(limits));
    let b = bind(NodeConfig::new(pki.identity("b"), pki.trust()).limits(quick_limits()).manual_ack(true));
    let (ab, ba) = connect(&a, &b, "b").await;
    let (ab, ba) = (ab.unwrap(), ba.unwrap());
    for i in 0..4u32 {
        ab.try_send_bytes(0, i.to_be_bytes().to_vec()).unwrap();
    }
    let e = ab.try_send_bytes(0, vec![9]).unwrap_err();
    assert!(matches!(e, Error::Full { messages: 4, .. }), "{e:?}");
    // `send` waits: nothing can free the outbox before the receiver acknowledges (manual-ack
    // mode, and it took nothing yet).
    let mut waiting = Box::pin(ab.send_bytes(0, vec![4]));
    assert!((&mut waiting).now_or_never().is_none());
    let m = ba.recv().await.unwrap();
    ba.ack(&m);
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap(), 5);
}

/// With the key usage limit lowered, a busy session moves to fresh keys again and again, and no
/// key seals more than its limit; nothing is lost or duplicated.
#[tokio::test]
async fn message_keys_are_replaced_before_their_usage_limit() {
    let pki = Pki::new("ca");
    let mut limits = quick_limits();
    limits.test_key_limits = (100, 1 << 30);
    let (_a, _b, ab, ba) = session_pair(&pki, limits.clone(), limits).await;
    const N: u32 = 1000;
    let sender = tokio::spawn({
        let ab = ab.clone();
        async move {
            for i in 0..N {
                ab.send((i % 2) as u16, &(i / 2)).await.unwrap();
            }
        }
    });
    receive_in_order(&ba, N as usize, 2).await;
    sender.await.unwrap();
    ab.delivered(0).await.unwrap();
    ab.delivered(1).await.unwrap();
    let s = ab.stats();
    // At most 50 messages per key before it asks for a fresh one (plus resends), so at least
    // N / 100 keys.
    assert!(s.rekeys >= u64::from(N) / 100, "{s:?}");
    assert!(ab.epoch() != 0 && !ab.is_ended());
}

/// Routine renewal: both nodes load a renewed certificate (new key, same names, same CA) and
/// the session moves to a new connection: it resumes instead of ending (sessions resume by what
/// the certificate names, not by its key).
#[tokio::test]
async fn sessions_survive_certificate_renewal_with_a_new_key() {
    let pki = Pki::new("ca");
    let (a, b, ab, ba) = session_pair(&pki, quick_limits(), quick_limits()).await;
    let (old_a, old_b) = (a.identity().fingerprint(), b.identity().fingerprint());
    a.reload(pki.identity("a"), pki.trust()).unwrap();
    b.reload(pki.identity("b"), pki.trust()).unwrap();
    assert_ne!(a.identity().fingerprint(), old_a);
    assert_ne!(b.identity().fingerprint(), old_b);
    let mut events = ab.events();
    ab.force_reconnect();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await.unwrap() {
                SessionEvent::Resumed => return Ok(()),
                SessionEvent::GaveUp { reason } => return Err(reason),
                _ => {}
            }
        }
    })
    .await
    .expect("resumed or gave up in time");
    assert_eq!(outcome, Ok(()));
    ab.send(0, &7u32).await.unwrap();
    assert_eq!(ba.recv().await.unwrap().decode::<u32>().unwrap(), 7);
    assert_eq!(ab.stats().reconnects, 1);
}
