//! A new session's first message, sent right behind the dialler's HELLO
//! (`Node::connect_and_send_bytes`, PROTOCOL.md section 2 "The early message"): it leaves before
//! the acceptor answers, reaches the application exactly once, goes nowhere when the acceptor
//! refuses the dialler, and a HELLO that announces less than every peer must accept is refused.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::*;
use bytes::Bytes;
use futures_util::FutureExt;
use quicseal::proto::seal::{self, EXPORTER_LABEL, KEY_MATERIAL_LEN, OpenConfig, Opener};
use quicseal::proto::wire::MessageKind;
use quicseal::{Error, NodeConfig, Policy, SessionEvent, Side, close_code};

/// A raw quinn acceptor with `pki`'s certificate for "server", which asks dialling nodes for
/// their certificates as a quicseal node does (and takes any the CA signed).
fn raw_acceptor(pki: &Pki) -> quinn::Endpoint {
    use quicseal::rustls;
    use quicseal::rustls::pki_types::PrivateKeyDer;
    use quicseal::rustls::pki_types::pem::PemObject;
    let issued = pki.issue(&pki.cert("server"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.cert_der().clone()).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![issued.cert_der.clone()],
            PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    cfg.alpn_protocols = vec![quicseal::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(cfg).unwrap();
    quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(quic)), std::net::SocketAddr::new(LOCALHOST, 0))
        .unwrap()
}

async fn read_frame(recv: &mut quinn::RecvStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    recv.read_exact(&mut head).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize];
    recv.read_exact(&mut body).await.unwrap();
    (head[0], body)
}

#[tokio::test]
async fn the_first_message_leaves_before_the_acceptor_answers_and_opens_under_the_new_keys() {
    let pki = Pki::new("ca");
    let acceptor = raw_acceptor(&pki);
    let addr = acceptor.local_addr().unwrap();
    let node = bind(NodeConfig::new(pki.identity("client"), pki.trust()));
    let dial = tokio::spawn(async move {
        let result = node.connect_and_send_bytes(addr, "server", 3, &b"sent early"[..]).await;
        (node, result)
    });
    let dial = Arc::new(tokio::sync::Mutex::new(Some(dial)));

    let conn = acceptor.accept().await.unwrap().await.unwrap();
    let (mut control_send, mut control) = conn.accept_bi().await.unwrap();
    let mut header = [0u8; 4];
    control.read_exact(&mut header).await.unwrap();
    assert_eq!(header, [1, 0, 0, 0], "the control stream comes first");
    let (frame_type, hello) = read_frame(&mut control).await;
    assert_eq!((frame_type, hello.len()), (0x01, 19));
    let dialler_epoch = u64::from_be_bytes(hello[4..12].try_into().unwrap());

    // Before we answer: the channel stream and its message are already here.
    let (_channel_send, mut channel) =
        tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await.expect("the early message").unwrap();
    channel.read_exact(&mut header).await.unwrap();
    assert_eq!(header, [1, 1, 0, 3], "channel 3's stream");
    let (frame_type, body) = read_frame(&mut channel).await;
    assert_eq!(frame_type, 0x02);
    let mut material = [0u8; KEY_MATERIAL_LEN];
    conn.export_keying_material(&mut material, EXPORTER_LABEL, b"").unwrap();
    let (_, opening) = seal::derive_keys(&material, seal::Role::Acceptor);
    let config = OpenConfig {
        max_payload: 1024,
        window_width: 2048,
        freshness_ms: 120_000,
        max_future_ms: 30_000,
        max_windows: 4,
    };
    let mut opener = Opener::new(opening, dialler_epoch, config);
    let mut frame = vec![0x02];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let opened = opener.open_bytes(&Bytes::from(frame), now).expect("sealed under the connection's keys");
    assert_eq!((opened.kind, opened.channel, opened.seq), (MessageKind::Stream, 3, 1));
    assert_eq!(&opened.payload[..], b"sent early");
    // The dialler still waits for our HELLO: only it says we accepted the dialler.
    assert!(dial.lock().await.as_mut().unwrap().now_or_never().is_none(), "returned before the acceptor's HELLO");

    let mut answer = vec![0x01, 0, 0, 0, 19, 0, 0x10, 0, 0];
    answer.extend_from_slice(&0x5eed_u64.to_be_bytes());
    answer.push(0);
    answer.extend_from_slice(&64u16.to_be_bytes());
    answer.extend_from_slice(&2048u32.to_be_bytes());
    control_send.write_all(&answer).await.unwrap();
    let (node, result) = dial.lock().await.take().unwrap().await.unwrap();
    let (session, seq) = result.unwrap();
    assert_eq!(seq, 1);
    assert_eq!(session.epoch(), dialler_epoch);
    // Our acknowledgement (ACK: channel 3, cumulative 1, no ranges) confirms it to the sender.
    let mut ack = vec![0x03, 0, 0, 0, 11, 0, 3];
    ack.extend_from_slice(&1u64.to_be_bytes());
    ack.push(0);
    control_send.write_all(&ack).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), session.delivered(3)).await.unwrap().unwrap();
    assert_eq!(session.stats().messages_sent, 1);
    drop(node);
}

#[tokio::test]
async fn first_messages_arrive_once_in_order_with_what_follows_across_a_reconnect() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()));
    let addr = server.local_addr().unwrap();
    // One early (fits in 1,024 bytes), one sent once the session is up (it does not).
    for (size, channel) in [(1024, 0u16), (1025, 7)] {
        let first = vec![b'f'; size];
        let (dialled, accepted) =
            tokio::join!(client.connect_and_send_bytes(addr, "server", channel, first.clone()), server.accept());
        let ((session, seq), accepted) = (dialled.unwrap(), accepted.unwrap());
        assert_eq!(seq, 1);
        session.send_bytes(channel, &b"second"[..]).await.unwrap();
        let mut events = session.events();
        session.force_reconnect();
        loop {
            if let SessionEvent::Resumed = events.recv().await.unwrap() {
                break;
            }
        }
        session.send_bytes(channel, &b"third"[..]).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..3 {
            let m = accepted.recv().await.unwrap();
            assert_eq!(m.channel(), channel);
            got.push(m.into_payload());
        }
        assert_eq!(got, [Bytes::from(first), Bytes::from_static(b"second"), Bytes::from_static(b"third")]);
        session.delivered(channel).await.unwrap();
        assert_eq!(accepted.stats().messages_delivered, 3, "each exactly once");
        assert_eq!(session.stats().messages_sent, 3);
    }
    // A typed first message, as `Session::send` encodes it.
    let (dialled, accepted) = tokio::join!(client.connect_and_send(addr, "server", 1, "typed"), server.accept());
    let ((session, _), accepted) = (dialled.unwrap(), accepted.unwrap());
    assert_eq!(accepted.recv().await.unwrap().decode::<String>().unwrap(), "typed");
    session.delivered(1).await.unwrap();
}

#[tokio::test]
async fn a_refused_dialler_delivers_nothing_and_bad_first_messages_are_refused_before_dialling() {
    let pki = Pki::new("ca");
    let server = bind(
        NodeConfig::new(pki.identity("server"), pki.trust()).policy(Policy::allow_list().allow_name("someone-else")),
    );
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()));
    let addr = server.local_addr().unwrap();
    let (dialled, accepted) =
        tokio::join!(client.connect_and_send_bytes(addr, "server", 0, &b"must not arrive"[..]), server.accept());
    assert!(matches!(dialled, Err(Error::Unauthorized { side: Side::Remote, .. })), "{dialled:?}");
    assert!(matches!(accepted, Err(Error::Unauthorized { side: Side::Local, .. })), "{accepted:?}");
    assert_eq!(server.stats().messages_delivered, 0);
    assert_eq!(server.buffered_bytes(), 0);

    let e = client.connect_and_send_bytes(addr, "server", 0xFFFF, &b"x"[..]).await.unwrap_err();
    assert!(matches!(e, Error::ReservedChannel(0xFFFF)), "{e:?}");
    let big = vec![0u8; quicseal::Limits::default().max_message_size + 1];
    let open = bind(NodeConfig::new(pki.identity("open"), pki.trust()));
    let (dialled, _accepted) =
        tokio::join!(client.connect_and_send_bytes(open.local_addr().unwrap(), "open", 0, big), open.accept());
    assert!(matches!(dialled, Err(Error::MessageTooLarge { .. })), "{dialled:?}");
}

#[tokio::test]
async fn a_hello_that_accepts_less_than_1024_bytes_is_a_protocol_violation() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let (_endpoint, conn) = raw_dial(&pki, &server, "raw").await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let mut hello = hello_bytes(0xabc);
    // max_message_size 1,023: one byte under what every peer must accept.
    hello[9..13].copy_from_slice(&1023u32.to_be_bytes());
    send.write_all(&hello).await.unwrap();
    let accepted = server.accept().await;
    assert!(
        matches!(
            &accepted,
            Err(Error::ProtocolViolation { side: Side::Local, violation: quicseal::Violation::BadHello })
        ),
        "{accepted:?}"
    );
    assert_eq!(app_code(&conn.closed().await), Some(u64::from(close_code::PROTOCOL_VIOLATION)));
}

/// An acceptor that refuses the dialler as soon as the TLS handshake is done: the refusal is
/// the error of `connect_and_send_bytes`, whichever of its steps notices the close (this loop
/// does not force the close to arrive before the first message is written; every step maps a
/// lost connection the same way).
#[tokio::test]
async fn an_acceptor_closing_at_once_is_a_refusal_of_connect_and_send() {
    let pki = Pki::new("ca");
    let acceptor = raw_acceptor(&pki);
    let addr = acceptor.local_addr().unwrap();
    let refuse = tokio::spawn(async move {
        while let Some(incoming) = acceptor.accept().await {
            if let Ok(conn) = incoming.await {
                conn.close(close_code::UNAUTHORIZED.into(), b"unauthorized");
            }
        }
    });
    let node = bind(NodeConfig::new(pki.identity("client"), pki.trust()));
    for _ in 0..20 {
        let e = node.connect_and_send_bytes(addr, "server", 0, &b"refused"[..]).await.unwrap_err();
        assert!(matches!(e, Error::Unauthorized { side: Side::Remote, .. }), "{e:?}");
    }
    refuse.abort();
}
