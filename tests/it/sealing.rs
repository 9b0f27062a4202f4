//! Integrity tags, replay windows, freshness, epochs and datagrams through real sessions. An
//! "insider" raw quinn peer holds a valid certificate and the real message keys (exported from
//! its own TLS session) and sends what a well-behaved node never would: replays, tampered
//! frames, stale frames, datagrams out of order.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::*;
use bytes::Bytes;
use futures_util::FutureExt;
use quicseal::proto::seal::{self, ChannelSealer, EXPORTER_LABEL, KEY_MATERIAL_LEN};
use quicseal::proto::wire::MessageKind;
use quicseal::{Error, Limits, Node, NodeConfig, Session, Stats, close_code};

const EPOCH: u64 = 0xfeed_beef;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A raw peer that completed the hello and holds the dialler's sealing key.
struct Insider {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    key: Arc<seal::SealingKey>,
    control: (quinn::SendStream, quinn::RecvStream),
}

impl Insider {
    async fn connect(pki: &Pki, server: &Node) -> (Insider, Session) {
        let (endpoint, conn) = raw_dial(pki, server, "insider").await;
        let (control, _) = raw_hello_epoch(&conn, EPOCH).await;
        let mut material = [0u8; KEY_MATERIAL_LEN];
        conn.export_keying_material(&mut material, EXPORTER_LABEL, b"").unwrap();
        let (key, _) = seal::derive_keys(&material, seal::Role::Dialler);
        let session = server.accept().await.unwrap();
        (Insider { _endpoint: endpoint, conn, key: Arc::new(key), control }, session)
    }

    fn sealer(&self, kind: MessageKind, channel: u16) -> ChannelSealer {
        ChannelSealer::new(self.key.clone(), EPOCH, kind, channel)
    }

    /// Opens channel `channel`'s stream and returns it after writing the stream header.
    async fn channel(&self, channel: u16) -> quinn::SendStream {
        let (mut send, _recv) = self.conn.open_bi().await.unwrap();
        let c = channel.to_be_bytes();
        send.write_all(&[1, 1, c[0], c[1]]).await.unwrap();
        send
    }
}

fn seal(s: &mut ChannelSealer, seq: u64, at: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    s.seal(seq, at, payload, &mut out).unwrap();
    out
}

async fn recv_payload(session: &Session) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(10), session.recv()).await.expect("a message").unwrap().payload().to_vec()
}

/// Waits (10 s at most) until the session's counters show `done`: the frames a check is about
/// have been processed, so what it asserts next does not depend on timing.
async fn until(session: &Session, done: impl Fn(&Stats) -> bool) {
    let settled = tokio::time::timeout(Duration::from_secs(10), async {
        while !done(&session.stats()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    settled.await.unwrap_or_else(|_| panic!("counters never settled: {:?}", session.stats()));
}

/// Nothing is waiting to be received now. Callers first make sure every frame that could have
/// delivered something was processed (a later frame on the same stream was delivered, or
/// [`until`] the counters show it), so this is a fact, not a guess made after a pause.
fn assert_nothing_waiting(session: &Session) {
    if let Some(r) = session.recv().now_or_never() {
        panic!("unexpected delivery: {r:?}");
    }
}

#[tokio::test]
async fn replayed_message_is_rejected_and_counted() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let (insider, session) = Insider::connect(&pki, &server).await;
    let mut stream = insider.channel(4).await;
    let mut sealer = insider.sealer(MessageKind::Stream, 4);
    let first = seal(&mut sealer, 1, now_ms(), b"pay me once");
    stream.write_all(&first).await.unwrap();
    stream.write_all(&first).await.unwrap(); // the same sealed bytes again
    stream.write_all(&seal(&mut sealer, 2, now_ms(), b"next")).await.unwrap();
    assert_eq!(recv_payload(&session).await, b"pay me once");
    // The copy came between the two on the stream: it was refused before "next" arrived.
    assert_eq!(recv_payload(&session).await, b"next");
    assert_nothing_waiting(&session);
    let stats = session.stats();
    assert_eq!(stats.replays_rejected, 1, "{stats:?}");
    assert_eq!(stats.messages_delivered, 2);
    assert_eq!(server.stats().replays_rejected, 1);
}

#[tokio::test]
async fn tampered_messages_are_dropped_counted_and_too_many_close_the_connection() {
    let pki = Pki::new("ca");
    let mut limits = Limits::default();
    limits.max_tag_failures = 3;
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()).limits(limits));
    let (mut insider, session) = Insider::connect(&pki, &server).await;
    let mut stream = insider.channel(0).await;
    let mut sealer = insider.sealer(MessageKind::Stream, 0);
    let genuine: Vec<Vec<u8>> =
        (1..=3u64).map(|seq| seal(&mut sealer, seq, now_ms(), format!("genuine {seq}").as_bytes())).collect();
    // Tampered copies of 1 and 2 (one ciphertext bit each), then the genuine 3.
    for m in &genuine[..2] {
        let mut bad = m.clone();
        let i = bad.len() - 20;
        bad[i] ^= 0x40;
        stream.write_all(&bad).await.unwrap();
    }
    stream.write_all(&genuine[2]).await.unwrap();
    // 3 waits for 1 and 2 (order: the receipts below would show 3 first otherwise), and
    // nothing is acknowledged before the application takes them (the first ACK frame on the
    // control stream, read below, is the one for all three).
    until(&session, |s| s.tag_failures == 2).await;
    assert_nothing_waiting(&session);
    let control = &mut insider.control.1;
    // The genuine 1 and 2 arrive (as a retransmission would bring them): all three, in order.
    stream.write_all(&genuine[0]).await.unwrap();
    stream.write_all(&genuine[1]).await.unwrap();
    for seq in 1..=3 {
        assert_eq!(recv_payload(&session).await, format!("genuine {seq}").as_bytes());
    }
    // Now the acknowledgement comes, on the control stream: channel 0, cumulative 3.
    let mut ack = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(5), control.read_exact(&mut ack)).await.unwrap().unwrap();
    assert_eq!(ack[..7], [0x03, 0, 0, 0, 11, 0, 0]);
    assert_eq!(u64::from_be_bytes(ack[7..15].try_into().unwrap()), 3);
    // The third failure closes the connection.
    let mut m = seal(&mut sealer, 4, now_ms(), b"again");
    m[40] ^= 1;
    stream.write_all(&m).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), insider.conn.closed()).await.unwrap();
    assert_eq!(app_code(&e), Some(u64::from(close_code::INTEGRITY_FAILURE)), "{e:?}");
    let e = session.recv().await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::ProtocolViolation {
                side: quicseal::Side::Local,
                violation: quicseal::Violation::IntegrityFailures(Some(3))
            }
        ),
        "{e:?}"
    );
    assert_eq!(session.stats().tag_failures, 3);
}

#[tokio::test]
async fn stale_and_future_messages_are_rejected() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let (insider, session) = Insider::connect(&pki, &server).await;
    // One channel each, so a refused message leaves no gap in front of the next.
    for (channel, at, text) in
        [(1u16, now_ms() - 121_000, "old"), (2, now_ms() + 60_000, "future"), (3, now_ms() - 5_000, "fine")]
    {
        let mut stream = insider.channel(channel).await;
        let mut sealer = insider.sealer(MessageKind::Stream, channel);
        stream.write_all(&seal(&mut sealer, 1, at, text.as_bytes())).await.unwrap();
        std::mem::forget(stream);
    }
    assert_eq!(recv_payload(&session).await, b"fine");
    until(&session, |s| s.stale_rejected == 2).await;
    assert_nothing_waiting(&session);
}

#[tokio::test]
async fn a_message_for_another_channel_or_epoch_is_refused() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let (insider, session) = Insider::connect(&pki, &server).await;
    let mut old = insider.channel(8).await;
    let mut other_epoch = ChannelSealer::new(insider.key.clone(), EPOCH + 1, MessageKind::Stream, 8);
    old.write_all(&seal(&mut other_epoch, 1, now_ms(), b"old session")).await.unwrap();
    let mut stream = insider.channel(1).await;
    let mut sealer = insider.sealer(MessageKind::Stream, 1);
    stream.write_all(&seal(&mut sealer, 1, now_ms(), b"current")).await.unwrap();
    assert_eq!(recv_payload(&session).await, b"current");
    until(&session, |s| s.replays_rejected == 1).await;
    assert_nothing_waiting(&session);
    // A frame sealed for channel 2 written on channel 1's stream is a protocol violation.
    let mut wrong = insider.sealer(MessageKind::Stream, 2);
    stream.write_all(&seal(&mut wrong, 1, now_ms(), b"moved")).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), insider.conn.closed()).await.unwrap();
    assert_eq!(app_code(&e), Some(u64::from(close_code::PROTOCOL_VIOLATION)), "{e:?}");
}

#[tokio::test]
async fn retired_epoch_is_refused() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let issued = pki.issue(&pki.cert("returning"));
    let endpoint = raw_endpoint();
    let addr = server.local_addr().unwrap();
    let conn =
        raw_connect(&endpoint, raw_client_config(&pki, Some(&issued), quicseal::ALPN), addr, "server").await.unwrap();
    let _control = raw_hello_epoch(&conn, 42).await;
    let session = server.accept().await.unwrap();
    conn.close(0u32.into(), b"bye");
    // The node retires the epoch as the session ends, before `closed` returns.
    let _ = session.closed().await;
    // The same peer comes back with the same epoch: refused.
    let conn =
        raw_connect(&endpoint, raw_client_config(&pki, Some(&issued), quicseal::ALPN), addr, "server").await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&hello_bytes(42)).await.unwrap();
    let mut buf = [0u8; 24];
    assert!(recv.read_exact(&mut buf).await.is_err());
    let e = conn.closed().await;
    assert_eq!(app_code(&e), Some(u64::from(close_code::RETIRED_EPOCH)), "{e:?}");
    let refused = server.accept().await.unwrap_err();
    assert!(
        matches!(
            refused,
            Error::ProtocolViolation {
                side: quicseal::Side::Local,
                violation: quicseal::Violation::RetiredEpoch(Some(_))
            }
        ),
        "{refused:?}"
    );
    // A new epoch is welcome.
    let conn =
        raw_connect(&endpoint, raw_client_config(&pki, Some(&issued), quicseal::ALPN), addr, "server").await.unwrap();
    let _control = raw_hello_epoch(&conn, 43).await;
    server.accept().await.unwrap();
}

#[tokio::test]
async fn datagrams_between_nodes() {
    let pki = Pki::new("ca");
    let a = bind(NodeConfig::new(pki.identity("a"), pki.trust()));
    let b = bind(NodeConfig::new(pki.identity("b"), pki.trust()));
    let (ab, ba) = connect(&a, &b, "b").await;
    let (ab, ba) = (ab.unwrap(), ba.unwrap());
    let max = ab.max_datagram_size().unwrap();
    assert!(max > 1000 && max < 1500, "{max}");
    for i in 0..20u8 {
        assert_eq!(ab.send_datagram(5, vec![i; 100]).await.unwrap(), u64::from(i) + 1);
    }
    let mut got = Vec::new();
    while got.len() < 20 {
        let m = tokio::time::timeout(Duration::from_secs(5), ba.recv()).await.expect("datagrams on loopback").unwrap();
        assert!(m.is_datagram());
        assert_eq!(m.channel(), 5);
        got.push(m.payload()[0]);
    }
    got.sort();
    assert_eq!(got, (0..20).collect::<Vec<u8>>());
    // Path MTU discovery may raise the limit while the test runs (it did, under load), so the
    // oversize datagram is one no path can carry, and the reported limit is the current one.
    let e = ab.send_datagram(5, vec![0; 64 * 1024]).await.unwrap_err();
    let now = ab.max_datagram_size().unwrap();
    assert!(matches!(e, Error::MessageTooLarge { limit, .. } if limit >= max && limit <= now), "{e:?} {max} {now}");
    assert_eq!(ab.stats().datagrams_sent, 20);
    assert_eq!(ba.stats().datagrams_delivered, 20);
}

#[tokio::test]
async fn datagrams_to_a_peer_that_turned_them_off_are_a_clear_error() {
    let pki = Pki::new("ca");
    let mut off = Limits::default();
    off.datagram_receive_buffer = 0;
    let a = bind(NodeConfig::new(pki.identity("a"), pki.trust()));
    let b = bind(NodeConfig::new(pki.identity("b"), pki.trust()).limits(off));
    let (ab, _ba) = connect(&a, &b, "b").await;
    let ab = ab.unwrap();
    assert!(matches!(ab.max_datagram_size(), Err(Error::DatagramsUnsupported(_))));
    assert!(matches!(ab.send_datagram(0, &b"x"[..]).await, Err(Error::DatagramsUnsupported(_))));
}

#[tokio::test]
async fn datagrams_out_of_order_inside_the_window_are_accepted_and_duplicates_refused() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let (insider, session) = Insider::connect(&pki, &server).await;
    let mut sealer = insider.sealer(MessageKind::Datagram, 2);
    let frames: Vec<Bytes> = (1..=3000u64).map(|i| seal(&mut sealer, i, now_ms(), &i.to_be_bytes()).into()).collect();
    // 3000 first, then 1000 (2000 behind: inside the default 2048 window), 952 (the lower edge
    // is 953: too old), 1000 again (duplicate), 2999.
    for i in [3000usize, 1000, 952, 1000, 2999, 953] {
        insider.conn.send_datagram(frames[i - 1].clone()).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await; // keep the sending order
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(u64::from_be_bytes(recv_payload(&session).await.try_into().unwrap()));
    }
    assert_eq!(got, [3000, 1000, 2999, 953]);
    until(&session, |s| s.replays_rejected + s.datagrams_dropped >= 4).await;
    assert_nothing_waiting(&session);
    let stats = session.stats();
    assert_eq!(stats.replays_rejected, 2, "{stats:?}");
    assert_eq!(stats.datagrams_dropped, 2, "{stats:?}");
    // Garbage in a datagram is dropped and counted, and does not close the session.
    insider.conn.send_datagram(Bytes::from_static(b"not a frame")).unwrap();
    insider.conn.send_datagram(frames[2997].clone()).unwrap(); // 2998
    assert_eq!(u64::from_be_bytes(recv_payload(&session).await.try_into().unwrap()), 2998);
    assert_eq!(session.stats().malformed_frames, 1);
}

/// Recorded UDP datagrams: (towards the server?, bytes).
type Recording = Arc<Mutex<Vec<(bool, Vec<u8>)>>>;

/// A UDP relay between two nodes that records every datagram and can replay them.
struct Relay {
    addr: SocketAddr,
    recorded: Recording,
    socket: Arc<tokio::net::UdpSocket>,
    client: Arc<Mutex<Option<SocketAddr>>>,
    server: SocketAddr,
}

impl Relay {
    async fn start(server: SocketAddr) -> Relay {
        let socket = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = socket.local_addr().unwrap();
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let client = Arc::new(Mutex::new(None));
        tokio::spawn({
            let (socket, recorded, client) = (socket.clone(), recorded.clone(), client.clone());
            async move {
                let mut buf = vec![0u8; 65536];
                // Bounded: a test relay stops by itself.
                for _ in 0..100_000 {
                    let Ok((n, from)) = socket.recv_from(&mut buf).await else { return };
                    let to_server = from != server;
                    if to_server {
                        *client.lock().unwrap() = Some(from);
                    }
                    recorded.lock().unwrap().push((to_server, buf[..n].to_vec()));
                    let to = if to_server { server } else { client.lock().unwrap().unwrap() };
                    let _ = socket.send_to(&buf[..n], to).await;
                }
            }
        });
        Relay { addr, recorded, socket, client, server }
    }

    /// Re-sends every recorded datagram, in order, to where it went.
    async fn replay_all(&self) -> usize {
        let recorded = self.recorded.lock().unwrap().clone();
        let client = self.client.lock().unwrap().unwrap();
        for (to_server, bytes) in &recorded {
            let to = if *to_server { self.server } else { client };
            self.socket.send_to(bytes, to).await.unwrap();
        }
        recorded.len()
    }
}

#[tokio::test]
async fn on_path_recording_replayed_later_delivers_nothing_extra() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()));
    let relay = Relay::start(server.local_addr().unwrap()).await;
    let (to_server, at_server) = tokio::join!(client.connect(relay.addr, "server"), server.accept());
    let (to_server, at_server) = (to_server.unwrap(), at_server.unwrap());
    for i in 0..50u32 {
        to_server.send(1, &i).await.unwrap();
        to_server.send_datagram(2, i.to_be_bytes().to_vec()).await.unwrap();
    }
    let mut datagrams = HashSet::new();
    for i in 0..50u32 {
        assert_eq!(next_message(&at_server, &mut datagrams).await, i);
    }
    to_server.delivered(1).await.unwrap();

    // Re-inject the whole recording on the live connection, twice. A message sent after the
    // replays along the same path comes after whatever they could deliver: only datagrams of
    // the first sending not received yet may come before it, never a second copy.
    let n = relay.replay_all().await;
    assert!(n >= 10, "{n} UDP datagrams recorded");
    relay.replay_all().await;
    to_server.send(1, &50u32).await.unwrap();
    assert_eq!(next_message(&at_server, &mut datagrams).await, 50);

    // And towards a new connection (a new session of the same client): still nothing extra.
    let (second, second_at) = tokio::join!(client.connect(server.local_addr().unwrap(), "server"), server.accept());
    let (second, second_at) = (second.unwrap(), second_at.unwrap());
    relay.replay_all().await;
    second.send(1, &7u32).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), second_at.recv()).await.unwrap().unwrap();
    assert_eq!(first.decode::<u32>().unwrap(), 7, "{first:?}");
    to_server.send(1, &999u32).await.unwrap();
    assert_eq!(next_message(&at_server, &mut datagrams).await, 999);
    assert!(datagrams.len() <= 50);
    // Datagrams count as delivered messages too.
    assert_eq!(at_server.stats().messages_delivered, 52 + datagrams.len() as u64);
}

/// Receives until the next channel message and returns it. What comes before it may only be
/// datagrams not received before (`seen` keeps those received): a second copy fails the test.
async fn next_message(session: &Session, seen: &mut HashSet<Bytes>) -> u32 {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), session.recv()).await.expect("a message").unwrap();
        if !m.is_datagram() {
            return m.decode().unwrap();
        }
        assert!(seen.insert(m.payload().clone()), "a datagram delivered twice: {m:?}");
    }
}

/// Every single-bit flip of a sealed message's epoch, sequence number, send time, payload and
/// tag, sent through a real session: each is refused and counted exactly once, nothing is
/// delivered, and the genuine message is delivered afterwards. (Flips of the frame header, kind
/// or channel are protocol violations that close the connection: see tests/it/limits.rs.)
#[tokio::test]
async fn every_bit_flip_through_a_session_is_refused_and_counted() {
    let pki = Pki::new("ca");
    let mut limits = Limits::default();
    limits.max_tag_failures = 100_000;
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()).limits(limits));
    let (insider, session) = Insider::connect(&pki, &server).await;
    let mut stream = insider.channel(6).await;
    let mut sealer = insider.sealer(MessageKind::Stream, 6);
    stream.write_all(&seal(&mut sealer, 1, now_ms(), b"first")).await.unwrap();
    assert_eq!(recv_payload(&session).await, b"first");
    let genuine = seal(&mut sealer, 2, now_ms(), b"8 bytes!");
    let first_flippable = 8; // after frame header (5), kind (1) and channel (2)
    let mut flips = 0u64;
    for bit in first_flippable * 8..genuine.len() * 8 {
        let mut bad = genuine.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        stream.write_all(&bad).await.unwrap();
        flips += 1;
    }
    stream.write_all(&genuine).await.unwrap();
    // The flips came before it on the stream: all were processed.
    assert_eq!(recv_payload(&session).await, b"8 bytes!");
    assert_nothing_waiting(&session);
    let s = session.stats();
    assert_eq!(s.tag_failures + s.replays_rejected + s.stale_rejected, flips, "{s:?}");
    assert!(s.tag_failures > 0 && s.replays_rejected > 0 && s.stale_rejected > 0, "{s:?}");
    assert_eq!(s.messages_delivered, 2);
}

fn rpc_request(epoch: u64, id: u64, method: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    quicseal::proto::rpc::RpcFrame::Request {
        call: quicseal::CallId { epoch, id },
        method: method.into(),
        budget_ms: 5_000,
        idempotent: false,
        body: Bytes::copy_from_slice(body),
    }
    .encode(&mut out)
    .unwrap();
    out
}

fn counting_router(runs: Arc<std::sync::atomic::AtomicUsize>) -> quicseal::Router {
    quicseal::Router::new().handle_bytes("count", move |_call, body: Bytes| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(body)
        }
    })
}

#[tokio::test]
async fn rpc_requests_are_sealed_messages_a_replayed_request_does_not_run_again() {
    let pki = Pki::new("ca");
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()).rpc(counting_router(runs.clone())));
    let (insider, session) = Insider::connect(&pki, &server).await;
    let mut stream = insider.channel(quicseal::REQUEST_CHANNEL).await;
    let mut sealer = insider.sealer(MessageKind::Stream, quicseal::REQUEST_CHANNEL);
    let request = seal(&mut sealer, 1, now_ms(), &rpc_request(EPOCH, 1, "count", b"x"));
    stream.write_all(&request).await.unwrap();
    stream.write_all(&request).await.unwrap(); // replayed byte for byte
    // A tampered copy of a new request fails its tag.
    let intact = seal(&mut sealer, 2, now_ms(), &rpc_request(EPOCH, 2, "count", b"y"));
    let mut tampered = intact.clone();
    let last = tampered.len() - 20;
    tampered[last] ^= 1;
    stream.write_all(&tampered).await.unwrap();
    let third = seal(&mut sealer, 3, now_ms(), &rpc_request(EPOCH, 3, "count", b"z"));
    stream.write_all(&third).await.unwrap();
    // Request 1 replayed once more: once it is refused, request 3 (before it on the stream)
    // has been taken in.
    stream.write_all(&request).await.unwrap();
    until(&session, |s| s.replays_rejected == 2 && s.tag_failures == 1 && s.rpc_requests == 1).await;
    let ran = tokio::time::timeout(Duration::from_secs(10), async {
        while runs.load(std::sync::atomic::Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    ran.await.unwrap();
    // Request 3 waits behind the lost request 2 (in order per channel): only request 1 ran.
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(session.stats().rpc_requests, 1);
    // The sender resends request 2 intact: 2 and 3 run, once each.
    stream.write_all(&intact).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while runs.load(std::sync::atomic::Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(session.stats().rpc_requests, 3);
}

#[tokio::test]
async fn a_malformed_rpc_frame_closes_the_session_as_a_protocol_violation() {
    for (channel, payload, why) in [
        (quicseal::REQUEST_CHANNEL, vec![0x01, 0, 0], "truncated request"),
        (quicseal::REQUEST_CHANNEL, vec![0x09; 17], "unknown kind"),
        (quicseal::RESPONSE_CHANNEL, rpc_request(EPOCH, 1, "count", b""), "request on the response channel"),
    ] {
        let pki = Pki::new("ca");
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()).rpc(counting_router(runs.clone())));
        let (insider, session) = Insider::connect(&pki, &server).await;
        let mut stream = insider.channel(channel).await;
        let mut sealer = insider.sealer(MessageKind::Stream, channel);
        stream.write_all(&seal(&mut sealer, 1, now_ms(), &payload)).await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(10), session.closed()).await.expect("closed");
        assert!(matches!(e, Error::ProtocolViolation { side: quicseal::Side::Local, .. }), "{why}: {e:?}");
        assert_eq!(session.stats().malformed_frames, 1, "{why}");
        let reason = insider.conn.closed().await;
        assert_eq!(app_code(&reason), Some(u64::from(close_code::PROTOCOL_VIOLATION)), "{why}");
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
