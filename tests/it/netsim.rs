//! quicseal sessions through the fault-injecting `netsim` link on loopback.

use std::time::Duration;

use crate::common::*;
use quicseal::netsim::{LinkConfig, Proxy};
use quicseal::{Error, Limits, NodeConfig, SessionEvent};

#[tokio::test]
async fn messages_survive_a_lossy_duplicating_reordering_corrupting_link() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()));
    let link = lossy_link(Duration::from_millis(10), 7);
    let (proxy, to_server, at_server) = connect_via_proxy(&client, &server, "server").await;
    proxy.reconfigure(link).unwrap();
    let sender = tokio::spawn(async move {
        for i in 0..2000u32 {
            to_server.send((i % 4) as u16, &i).await.unwrap();
        }
        for ch in 0..4 {
            to_server.delivered(ch).await.unwrap();
        }
        to_server
    });
    let mut next = [0u32, 1, 2, 3];
    for _ in 0..2000 {
        let m = tokio::time::timeout(Duration::from_secs(30), at_server.recv()).await.unwrap().unwrap();
        let ch = m.channel() as usize;
        assert_eq!(m.decode::<u32>().unwrap(), next[ch], "channel {ch} in order, exactly once");
        next[ch] += 4;
    }
    let to_server = sender.await.unwrap();
    let s = proxy.stats();
    assert!(s.lost > 0 && s.duplicated > 0 && s.reordered > 0 && s.corrupted > 0, "{s:?}");
    // QUIC drops what the link corrupted or duplicated before our layer sees it.
    assert_eq!(at_server.stats().messages_delivered, 2000);
    assert_eq!(at_server.stats().tag_failures, 0);
    drop(to_server);
}

#[tokio::test]
async fn a_blackout_longer_than_the_resume_timeout_ends_the_session() {
    let pki = Pki::new("ca");
    let mut limits = Limits::default();
    limits.idle_timeout = Duration::from_millis(600);
    limits.keep_alive = Some(Duration::from_millis(200));
    limits.resume_timeout = Duration::from_secs(1);
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()).limits(limits.clone()));
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()).limits(limits));
    let (proxy, to_server, at_server) = connect_via_proxy(&client, &server, "server").await;
    let mut events = to_server.events();
    proxy.set_blackout(true);
    let e = tokio::time::timeout(Duration::from_secs(20), to_server.closed()).await.unwrap();
    assert!(matches!(e, Error::Timeout { what: quicseal::Timed::SessionResumption }), "{e:?}");
    let e = tokio::time::timeout(Duration::from_secs(20), at_server.closed()).await.unwrap();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        seen.push(ev);
    }
    assert!(matches!(seen.first(), Some(SessionEvent::Disconnected { .. })), "{seen:?}");
    assert!(seen.iter().any(|e| matches!(e, SessionEvent::Reconnecting { .. })), "{seen:?}");
    assert!(seen.iter().any(|e| matches!(e, SessionEvent::GaveUp { .. })), "{seen:?}");
    assert_eq!(seen.last(), Some(&SessionEvent::Ended));
    assert!(proxy.stats().blackout_lost > 0);
}

#[tokio::test]
async fn only_loopback_targets() {
    let e = Proxy::start("127.0.0.1:0".parse().unwrap(), "192.0.2.1:9".parse().unwrap(), LinkConfig::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
}

/// A restarted process comes back from a new port: the link keeps serving new clients beyond
/// its client limit by letting go of the ones heard from least recently (it once ignored every
/// client after the 64th, which stalled a long crash test).
#[tokio::test]
async fn the_link_serves_new_clients_beyond_its_client_limit() {
    let target = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = target.recv_from(&mut buf).await {
            let _ = target.send_to(&buf[..n], from).await;
        }
    });
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), target_addr, LinkConfig::default()).await.unwrap();
    for i in 0..quicseal::netsim::MAX_CLIENTS + 10 {
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ping = format!("ping {i}");
        client.send_to(ping.as_bytes(), proxy.local_addr()).await.unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("client {i} got no echo: {:?}", proxy.stats()))
            .unwrap();
        assert_eq!(&buf[..n], ping.as_bytes());
    }
}
