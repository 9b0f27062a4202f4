//! Limits and hostile peers: oversize messages, garbage on streams, too many channels and
//! connections. A raw quinn peer with a valid certificate sends what our API never would.

use std::time::Duration;

use crate::common::*;
use quicseal::{Error, Limited, Limits, NodeConfig, Session, Side, close_code};

/// A raw quinn peer that completed the quicseal hello with `server`, and the session the
/// server accepted for it.
async fn raw_peer(pki: &Pki, server: &quicseal::Node) -> (quinn::Endpoint, quinn::Connection, Session) {
    let (endpoint, conn) = raw_dial(pki, server, "raw").await;
    let control = raw_hello(&conn).await;
    std::mem::forget(control); // keep the control stream open for the test's lifetime
    let session = server.accept().await.unwrap();
    (endpoint, conn, session)
}

async fn expect_closed_with(conn: &quinn::Connection, code: u32) {
    let e = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.expect("peer closed us");
    assert_eq!(app_code(&e), Some(u64::from(code)), "{e:?}");
}

#[tokio::test]
async fn oversize_message_is_refused_at_send() {
    let pki = Pki::new("ca");
    let a = bind(NodeConfig::new(pki.identity("a"), pki.trust()));
    let b = bind(NodeConfig::new(pki.identity("b"), pki.trust()));
    let (ab, ba) = connect(&a, &b, "b").await;
    let (ab, ba) = (ab.unwrap(), ba.unwrap());
    let limit = 1 << 20;
    assert_eq!(ab.max_message_size(), limit);
    let e = ab.send_bytes(0, vec![0u8; limit + 1]).await.unwrap_err();
    assert!(matches!(e, Error::MessageTooLarge { size, limit: l } if size == limit + 1 && l == limit), "{e:?}");
    // Exactly at the limit is fine, and the session still works after the refusal.
    ab.send_bytes(0, vec![7u8; limit]).await.unwrap();
    assert_eq!(ba.recv().await.unwrap().payload().len(), limit);
}

#[tokio::test]
async fn the_peers_smaller_limit_is_respected_at_send() {
    let pki = Pki::new("ca");
    let mut small = Limits::default();
    small.max_message_size = 1024;
    let a = bind(NodeConfig::new(pki.identity("a"), pki.trust()));
    let b = bind(NodeConfig::new(pki.identity("b"), pki.trust()).limits(small));
    let (ab, ba) = connect(&a, &b, "b").await;
    let (ab, _ba) = (ab.unwrap(), ba.unwrap());
    assert_eq!(ab.max_message_size(), 1024);
    let e = ab.send_bytes(0, vec![0u8; 1025]).await.unwrap_err();
    assert!(matches!(e, Error::MessageTooLarge { size: 1025, limit: 1024 }), "{e:?}");
}

#[tokio::test]
async fn peer_sending_an_oversize_message_is_closed() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let (_ep, conn, session) = raw_peer(&pki, &server).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    // Channel 0, then a MESSAGE header announcing 1 MiB + 1 byte of payload: refused from the
    // header, before the body is read or allocated.
    let len = ((1u32 << 20) + 1 + 43).to_be_bytes();
    send.write_all(&[1, 1, 0, 0, 0x02, len[0], len[1], len[2], len[3]]).await.unwrap();
    send.write_all(&[0; 27]).await.unwrap();
    expect_closed_with(&conn, close_code::MESSAGE_TOO_LARGE).await;
    let e = session.recv().await.unwrap_err();
    match e {
        Error::ProtocolViolation {
            side: Side::Local,
            violation: quicseal::Violation::Malformed(quicseal::proto::wire::WireError::TooLarge { .. }),
        } => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn garbage_on_a_stream_closes_that_peer_and_the_node_keeps_serving_others() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let good = bind(NodeConfig::new(pki.identity("good"), pki.trust()));
    let (to_server, at_server) = connect(&good, &server, "server").await;
    let (to_server, at_server) = (to_server.unwrap(), at_server.unwrap());

    // A MESSAGE of kind datagram (0x01) on channel 9's stream: 43-byte body, zero tag.
    let mut datagram_on_stream = vec![1, 1, 0, 9, 0x02, 0, 0, 0, 43, 0x01, 0, 9];
    datagram_on_stream.extend_from_slice(&[0; 40]);
    // A 200,000-byte body announced (larger than a read chunk), 100,000 bytes sent, then FIN.
    let mut truncated_large = vec![1, 1, 0, 9, 0x02];
    truncated_large.extend_from_slice(&200_000u32.to_be_bytes());
    truncated_large.extend_from_slice(&[0; 100_000]);
    let garbage: [&[u8]; 9] = [
        &[1, 1],                                                  // stream ends inside its header
        &[1, 1, 0, 9, 0x02, 0, 0],                                // stream ends inside a frame header
        b"GET / HTTP/1.1\r\n\r\n",                                // not a stream header
        &[1, 1, 0, 9, 0x7f, 0, 0, 0, 0],                          // unknown frame type on channel 9
        &[1, 1, 0, 9, 0x03, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1],  // ACK on an inbound channel
        &[1, 1, 0, 9, 0x02, 0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0, 1], // MESSAGE shorter than its prefix and tag
        &[1, 1, 0, 9, 0x02, 0, 0, 0, 60, 0, 0, 9, 1, 2, 3],       // truncated body, then FIN
        &datagram_on_stream,
        &truncated_large,
    ];
    for (i, bytes) in garbage.iter().enumerate() {
        let (_ep, conn, session) = raw_peer(&pki, &server).await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        send.finish().unwrap();
        expect_closed_with(&conn, close_code::PROTOCOL_VIOLATION).await;
        let e = session.recv().await.unwrap_err();
        assert!(matches!(e, Error::ProtocolViolation { side: Side::Local, .. }), "case {i}: {e:?}");

        // The well-behaved session is untouched.
        to_server.send(0, &(i as u32)).await.unwrap();
        assert_eq!(at_server.recv().await.unwrap().decode::<u32>().unwrap(), i as u32);
    }
    // And new sessions are still accepted.
    let late = bind(NodeConfig::new(pki.identity("late"), pki.trust()));
    let (c, s) = connect(&late, &server, "server").await;
    c.unwrap();
    s.unwrap();
}

#[tokio::test]
async fn peer_that_never_says_hello_times_out() {
    let pki = Pki::new("ca");
    let mut limits = Limits::default();
    limits.handshake_timeout = Duration::from_millis(300);
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()).limits(limits));
    let (_endpoint, conn) = raw_dial(&pki, &server, "silent").await;
    let e = server.accept().await.unwrap_err();
    assert!(matches!(e, Error::Timeout { what: quicseal::Timed::Handshake }), "{e:?}");
    // The half-open connection does not linger: it is closed once the deadline passed, with
    // the close code that says why.
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.expect("closed");
    assert_eq!(app_code(&closed), Some(u64::from(close_code::HELLO_TIMEOUT)), "{closed:?}");
}

#[tokio::test]
async fn channel_limit_is_a_typed_error() {
    let pki = Pki::new("ca");
    let mut limits = Limits::default();
    limits.max_channels = 2;
    let (_a, _b, ab, _ba) = session_pair(&pki, limits.clone(), limits).await;
    ab.send(10, &1u8).await.unwrap();
    ab.send(20, &1u8).await.unwrap();
    ab.send(10, &2u8).await.unwrap(); // an existing channel is fine
    let e = ab.send(30, &1u8).await.unwrap_err();
    assert!(matches!(e, Error::Limit { what: Limited::ChannelsPerSession, limit: 2 }), "{e:?}");
}

#[tokio::test]
async fn connection_limit_refuses_extra_peers() {
    let pki = Pki::new("ca");
    let mut limits = Limits::default();
    limits.max_connections = 1;
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()).limits(limits.clone()));
    let first = bind(NodeConfig::new(pki.identity("first"), pki.trust()));
    let (c1, s1) = connect(&first, &server, "server").await;
    let (_c1, _s1) = (c1.unwrap(), s1.unwrap());
    let second = bind(NodeConfig::new(pki.identity("second"), pki.trust()));
    let e = second.connect(server.local_addr().unwrap(), "server").await.unwrap_err();
    assert!(matches!(e, Error::Refused), "{e:?}");
    // Incoming connections never block the node's own dials: they count apart.
    let (out, inc) = connect(&server, &second, "second").await;
    let (_out, _inc) = (out.unwrap(), inc.unwrap());
    // A node at its own dial limit refuses to dial.
    let e = server.connect(first.local_addr().unwrap(), "first").await.unwrap_err();
    assert!(matches!(e, Error::Limit { what: Limited::ConnectionsPerNode, limit: 1 }), "{e:?}");
    assert_eq!(server.stats().handshakes_refused, 1);
}

#[tokio::test]
async fn receive_buffer_equal_to_the_message_limit_still_delivers_a_full_message() {
    let pki = Pki::new("ca");
    let mut limits = Limits::default();
    limits.max_message_size = 64 * 1024;
    limits.receive_buffer = 64 * 1024;
    let (_a, _b, ab, ba) = session_pair(&pki, limits.clone(), limits).await;
    for _ in 0..3 {
        ab.send_bytes(0, vec![1u8; 64 * 1024]).await.unwrap();
    }
    for _ in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(10), ba.recv()).await.expect("no deadlock").unwrap();
        assert_eq!(m.payload().len(), 64 * 1024);
    }
}

/// Eight channels share a receive buffer that holds eight messages while the application reads
/// slowly: nothing may be recorded as received and then dropped (its resend would be refused as
/// a replay and the channel would stall for good). Every message arrives once, in order.
#[tokio::test]
async fn many_channels_into_a_small_receive_buffer_with_a_slow_reader_deliver_everything() {
    const CHANNELS: u16 = 8;
    const PER_CHANNEL: u32 = 60;
    let pki = Pki::new("ca");
    let mut limits = Limits::default();
    limits.max_message_size = 64 * 1024;
    limits.receive_buffer = 128 * 1024;
    let (_a, _b, ab, ba) = session_pair(&pki, limits.clone(), limits).await;
    let mut senders = Vec::new();
    for ch in 0..CHANNELS {
        let ab = ab.clone();
        senders.push(tokio::spawn(async move {
            for i in 0..PER_CHANNEL {
                let mut body = vec![ch as u8; 16 * 1024];
                body[..4].copy_from_slice(&i.to_be_bytes());
                ab.send_bytes(ch, body).await.unwrap();
            }
        }));
    }
    let mut next = [0u32; CHANNELS as usize];
    let all = tokio::time::timeout(Duration::from_secs(90), async {
        for _ in 0..u32::from(CHANNELS) * PER_CHANNEL {
            let m = ba.recv().await.unwrap();
            let ch = m.channel() as usize;
            let i = u32::from_be_bytes(m.payload()[..4].try_into().unwrap());
            assert_eq!(i, next[ch], "channel {ch}: out of order or duplicated");
            next[ch] += 1;
            // A slightly slow application.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(all.is_ok(), "stalled: delivered per channel {next:?}, receiver stats {:?}", ba.stats());
    for s in senders {
        s.await.unwrap();
    }
    for ch in 0..CHANNELS {
        ab.delivered(ch).await.unwrap();
    }
    let s = ba.stats();
    assert_eq!(s.replays_rejected, 0, "{s:?}");
}

/// Nodes with different channel limits: the dialler may open no more channels than the acceptor
/// announced, and says so at `send`; channels already open keep working both ways.
#[tokio::test]
async fn channel_counts_are_negotiated_and_a_channel_the_peer_cannot_open_fails_at_send() {
    let pki = Pki::new("ca");
    let mut many = Limits::default();
    many.max_channels = 100;
    let mut few = Limits::default();
    few.max_channels = 64;
    let (_a, _b, ab, ba) = session_pair(&pki, many, few).await;
    for ch in 0..64u16 {
        ab.send(ch, &u32::from(ch)).await.unwrap();
    }
    let e = ab.send(69, &69u32).await.unwrap_err();
    assert!(matches!(e, Error::Limit { what: Limited::ChannelsPerSession, limit: 64 }), "{e:?}");
    // Both directions of channel 0 still work.
    ab.send(0, &1000u32).await.unwrap();
    ba.send(0, &2000u32).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        let mut n = 0;
        while n < 65 {
            ba.recv().await.unwrap();
            n += 1;
        }
        ab.recv().await.unwrap().decode::<u32>().unwrap()
    })
    .await
    .expect("no stall");
    assert_eq!(got, 2000);
    ab.delivered(0).await.unwrap();
}

/// Unanswered ClientHellos, each a real QUIC Initial from a real quinn client that then goes
/// silent: `n` of them, each with its own connection ID, captured at a socket that never answers.
async fn captured_initials(pki: &Pki, n: usize) -> Vec<Vec<u8>> {
    let sink = tokio::net::UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    let to = sink.local_addr().unwrap();
    let endpoint = raw_endpoint();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(raw_client_config(pki, None, quicseal::ALPN)).unwrap();
    let cfg = quinn::ClientConfig::new(std::sync::Arc::new(quic));
    let mut attempts = Vec::new();
    let mut initials = std::collections::HashSet::new();
    let mut buf = vec![0u8; 2048];
    while initials.len() < n {
        attempts.push(endpoint.connect_with(cfg.clone(), to, "server").unwrap());
        let (len, _) = sink.recv_from(&mut buf).await.unwrap();
        initials.insert(buf[..len].to_vec());
    }
    endpoint.close(0u32.into(), b"");
    initials.into_iter().collect()
}

/// A handshake flood: a raw UDP socket sends 4,000 unanswered ClientHellos at about 1,000 a second,
/// ten times the rate that fills the default 1,024 connection slots within the 10 s handshake
/// timeout. Meanwhile a valid peer connects at once, and an established session survives a
/// forced reconnect. The flood is answered with Retry packets and holds only a few slots.
#[tokio::test]
async fn a_handshake_flood_does_not_lock_out_valid_peers_or_live_sessions() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let old = bind(NodeConfig::new(pki.identity("old"), pki.trust()));
    let (live, live_server) = connect(&old, &server, "server").await;
    let (live, live_server) = (live.unwrap(), live_server.unwrap());
    let initials = captured_initials(&pki, 4000).await;
    let target = server.local_addr().unwrap();
    // Signalled once the flood has sent twice as many ClientHellos as there are connection slots.
    let (built_up, flood_built_up) = tokio::sync::oneshot::channel();
    let flood = tokio::spawn(async move {
        let socket = tokio::net::UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut built_up = Some(built_up);
        for (i, batch) in initials.chunks(10).enumerate() {
            tick.tick().await;
            for packet in batch {
                let _ = socket.send_to(packet, target).await;
            }
            if i * 10 >= 2 * 1024 {
                built_up.take().map(|b| b.send(()));
            }
        }
    });
    flood_built_up.await.unwrap();
    let fresh = bind(NodeConfig::new(pki.identity("fresh"), pki.trust()));
    let dialled = tokio::time::timeout(Duration::from_secs(2), async {
        tokio::join!(fresh.connect(target, "server"), server.accept())
    })
    .await
    .expect("a valid peer gets in during the flood");
    let (fresh_session, accepted) = (dialled.0.unwrap(), dialled.1.unwrap());
    fresh_session.send(0, &1u8).await.unwrap();
    assert_eq!(accepted.recv().await.unwrap().decode::<u8>().unwrap(), 1);
    // The established session moves to a new connection during the flood and carries on.
    let mut events = live.events();
    live.force_reconnect();
    let resumed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await.unwrap() {
                quicseal::SessionEvent::Resumed => return true,
                quicseal::SessionEvent::GaveUp { .. } => return false,
                _ => {}
            }
        }
    })
    .await
    .expect("resumed or gave up in time");
    assert!(resumed, "the live session gave up during the flood");
    live.send(0, &2u8).await.unwrap();
    assert_eq!(live_server.recv().await.unwrap().decode::<u8>().unwrap(), 2);
    flood.await.unwrap();
    let s = server.stats();
    assert!(s.retries_sent > 1000, "the flood must be answered with Retry: {s:?}");
}

/// Handshakes in progress have their own, smaller budget, per node and per address; what is
/// refused is counted.
#[tokio::test]
async fn handshakes_in_progress_are_bounded_per_address_and_counted() {
    let pki = Pki::new("ca");
    let mut limits = Limits::default();
    limits.max_handshakes_per_address = 4;
    limits.retry_above = 1000; // no Retry: the per-address budget alone
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()).limits(limits));
    let target = server.local_addr().unwrap();
    let initials = captured_initials(&pki, 10).await;
    let socket = tokio::net::UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    for packet in &initials {
        socket.send_to(packet, target).await.unwrap();
    }
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let s = server.stats();
            if s.handshakes_refused >= 6 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("six of ten refused");
    assert_eq!(refused.handshakes_refused, 6, "{refused:?}");
}

/// One peer may hold only so many connections with a node; when one closes, it may dial again.
#[tokio::test]
async fn connections_per_peer_are_limited() {
    let pki = Pki::new("ca");
    let mut limits = Limits::default();
    limits.max_connections_per_peer = 2;
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()).limits(limits));
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()));
    let (c1, _s1) = connect(&client, &server, "server").await;
    let (c2, _s2) = connect(&client, &server, "server").await;
    let (c1, _c2) = (c1.unwrap(), c2.unwrap());
    let (c3, s3) = connect(&client, &server, "server").await;
    assert!(matches!(c3, Err(Error::Refused)), "{c3:?}");
    assert!(matches!(s3, Err(Error::Limit { what: Limited::ConnectionsPerPeer, limit: 2 })), "{s3:?}");
    // Another peer is not affected.
    let other = bind(NodeConfig::new(pki.identity("other"), pki.trust()));
    let (o, so) = connect(&other, &server, "server").await;
    o.unwrap();
    so.unwrap();
    // A closed connection frees its place (once the close has reached the server).
    c1.close();
    let again = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match connect(&client, &server, "server").await {
                (Ok(c), Ok(s)) => return (c, s),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert!(again.is_ok(), "the freed place was not given back");
}

/// All sessions of a node share a budget for received-but-unread bytes: two peers flooding a
/// node whose application reads nothing fill it, never more (plus one message per session),
/// and everything arrives once the application reads.
#[tokio::test]
async fn the_node_bounds_unread_bytes_over_all_sessions() {
    let pki = Pki::new("ca");
    let mut limits = Limits::default();
    limits.max_message_size = 64 * 1024;
    limits.receive_buffer = 256 * 1024;
    limits.node_receive_buffer = 256 * 1024;
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()).limits(limits));
    let bound = 256 * 1024 + 2 * 64 * 1024;
    let mut ends = Vec::new();
    let mut senders = Vec::new();
    for name in ["p1", "p2"] {
        let peer = bind(NodeConfig::new(pki.identity(name), pki.trust()));
        let (c, s) = connect(&peer, &server, "server").await;
        let c = c.unwrap();
        ends.push((peer, s.unwrap()));
        senders.push(tokio::spawn(async move {
            for i in 0..20u32 {
                c.send_bytes(0, vec![i as u8; 64 * 1024]).await.unwrap();
            }
            c.delivered(0).await.unwrap();
        }));
    }
    // While the application reads nothing, the budget fills, and never overflows.
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let b = server.buffered_bytes();
            assert!(b <= bound, "{b} bytes buffered, bound {bound}");
            if b >= 256 * 1024 - 64 * 1024 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the budget fills");
    for (_, s) in &ends {
        for i in 0..20u32 {
            assert_eq!(s.recv().await.unwrap().payload()[0], i as u8);
            assert!(server.buffered_bytes() <= bound);
        }
    }
    for s in senders {
        s.await.unwrap();
    }
    assert_eq!(server.buffered_bytes(), 0);
}
