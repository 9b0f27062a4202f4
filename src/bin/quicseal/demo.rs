//! `quicseal demo`: a throwaway PKI in a temp dir, two nodes on loopback exchanging messages
//! both ways, intruders refused, messages and RPC calls through a lossy link. Exits 0 only if
//! everything behaved.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quicseal::netsim::{LinkConfig, Proxy};
use quicseal::pki::{Ca, KeyType, NodeCert};
use quicseal::{ApplicationError, Call, Error, Identity, Node, NodeConfig, Router, TlsError, TrustStore};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Note {
    from: String,
    seq: u32,
    text: String,
}

const LOOPBACK: &str = "127.0.0.1:0";

/// Runs the demo and writes its report to `out`.
pub(crate) async fn run(out: &mut impl Write) -> crate::Result<()> {
    let started = Instant::now();
    let mut checks = Checks::default();
    let dir = tempfile::tempdir()?;
    writeln!(out, "quicseal demo: mutual TLS over QUIC on loopback\n")?;

    // 1. A throwaway PKI, written to files and loaded back as operators do.
    let ca = Ca::new("quicseal demo CA", KeyType::EcdsaP256, Duration::from_secs(3600))?;
    write_file(dir.path(), "ca.crt", ca.cert_pem())?;
    for name in ["alice", "bob"] {
        let issued = ca.issue(&NodeCert::new(name).dns(name).uri(format!("spiffe://demo.quicseal/node/{name}")))?;
        write_file(dir.path(), &format!("{name}.crt"), &issued.chain_pem)?;
        write_file(dir.path(), &format!("{name}.key"), &issued.key_pem)?;
    }
    writeln!(out, "PKI      CA and node certificates for alice and bob in {}", dir.path().display())?;
    let trust = TrustStore::from_ca_file(dir.path().join("ca.crt"))?;
    let load = |name: &str| {
        Identity::from_pem_files(dir.path().join(format!("{name}.crt")), dir.path().join(format!("{name}.key")))
    };
    let alice = Node::bind(LOOPBACK.parse().expect("literal"), NodeConfig::new(load("alice")?, trust.clone()))?;
    // bob also serves RPC: "double" counts how often it runs, "slow" outlives any sane deadline.
    let runs = Arc::new(AtomicU64::new(0));
    let router = Router::new()
        .handle("double", {
            let runs = runs.clone();
            move |_call: Call, x: u64| {
                runs.fetch_add(1, Ordering::Relaxed);
                async move { Ok::<_, ApplicationError>(x * 2) }
            }
        })
        .handle("slow", |call: Call, ()| async move {
            call.cancelled().await;
            Ok::<_, ApplicationError>(())
        });
    let bob = Node::bind(LOOPBACK.parse().expect("literal"), NodeConfig::new(load("bob")?, trust.clone()).rpc(router))?;
    let bob_addr = bob.local_addr()?;
    writeln!(out, "nodes    alice on {}, bob on {bob_addr}", alice.local_addr()?)?;

    // 2. alice dials bob; both see the other's typed identity.
    let (to_bob, at_bob) = tokio::join!(alice.connect(bob_addr, "bob"), bob.accept());
    let (to_bob, at_bob) = (to_bob?, at_bob?);
    writeln!(out, "session  alice sees {}", to_bob.peer())?;
    writeln!(out, "         bob sees   {}", at_bob.peer())?;
    checks.record("alice sees bob's SPIFFE ID", to_bob.peer().spiffe_id() == Some("spiffe://demo.quicseal/node/bob"));
    checks.record("bob sees alice's SPIFFE ID", at_bob.peer().spiffe_id() == Some("spiffe://demo.quicseal/node/alice"));

    // 3. Messages both ways, each confirmed by the other side's application.
    const N: u32 = 5;
    for seq in 1..=N {
        to_bob.send(1, &Note { from: "alice".into(), seq, text: format!("hello bob #{seq}") }).await?;
    }
    let mut got = Vec::new();
    for _ in 0..N {
        let m = at_bob.recv().await?;
        let note: Note = m.decode()?;
        checks.record_quiet(note.from == "alice" && m.peer().dns_names == ["alice"]);
        got.push(note.seq);
        at_bob.send(1, &Note { from: "bob".into(), seq: note.seq, text: format!("got #{}", note.seq) }).await?;
    }
    let mut replies = Vec::new();
    for _ in 0..N {
        replies.push(to_bob.recv().await?.decode::<Note>()?.seq);
    }
    to_bob.delivered(1).await?;
    at_bob.delivered(1).await?;
    let in_order: Vec<u32> = (1..=N).collect();
    writeln!(out, "messages alice -> bob: {N} sent, {} delivered in order, all acknowledged", got.len())?;
    writeln!(out, "         bob -> alice: {N} sent, {} delivered in order, all acknowledged", replies.len())?;
    checks.record("alice -> bob delivered in order", got == in_order);
    checks.record("bob -> alice delivered in order", replies == in_order);

    // 4. mallory has a certificate from another CA: refused on both sides.
    let rogue = Ca::new("rogue CA", KeyType::EcdsaP256, Duration::from_secs(3600))?;
    let m = rogue.issue(&NodeCert::new("mallory").dns("mallory"))?;
    let mallory = Node::bind(
        LOOPBACK.parse().expect("literal"),
        NodeConfig::new(Identity::from_pem(m.chain_pem.as_bytes(), m.key_pem.as_bytes())?, trust.clone()),
    )?;
    let (dialled, accepted) = tokio::join!(mallory.connect(bob_addr, "bob"), bob.accept());
    writeln!(out, "intruder mallory (certificate from another CA):")?;
    report(out, "mallory", &dialled)?;
    report(out, "bob", &accepted)?;
    checks.record(
        "mallory refused by bob's TLS (unknown CA)",
        matches!(
            &accepted,
            Err(Error::Tls(TlsError::Local {
                error: quicseal::rustls::Error::InvalidCertificate(quicseal::rustls::CertificateError::UnknownIssuer),
                ..
            }))
        ),
    );
    checks.record(
        "mallory told only that its CA is unknown",
        matches!(&dialled, Err(Error::Tls(TlsError::Remote { alert: quicseal::rustls::AlertDescription::UnknownCA }))),
    );

    // 5. An anonymous client with no certificate at all: refused.
    let (anon, accepted) = tokio::join!(anonymous_dial(&ca, bob_addr), bob.accept());
    writeln!(out, "intruder anonymous client (no certificate):")?;
    writeln!(out, "         client: {anon}")?;
    report(out, "bob", &accepted)?;
    checks.record(
        "anonymous client refused (no certificate)",
        matches!(
            &accepted,
            Err(Error::Tls(TlsError::Local { error: quicseal::rustls::Error::NoCertificatesPresented, .. }))
        ),
    );

    // 6. An insider with a valid certificate and the real message keys replays a message and
    //    tampers with another: both are refused and counted, the genuine ones delivered.
    let eve = ca.issue(&NodeCert::new("eve").dns("eve"))?;
    let (insider, at_eve) = tokio::join!(insider_replay_and_tamper(&ca, &eve, bob_addr), bob.accept());
    let at_eve = at_eve?;
    let mut genuine = Vec::new();
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(300), at_eve.recv()).await {
        genuine.push(String::from_utf8_lossy(m.payload()).into_owned());
    }
    let stats = at_eve.stats();
    writeln!(out, "insider  eve (valid certificate, real keys) sends 2 genuine, 1 replayed, 1 tampered message:")?;
    writeln!(out, "         eve: {insider}")?;
    writeln!(
        out,
        "         bob delivered {:?}; refused {} replay(s), {} tag failure(s)",
        genuine, stats.replays_rejected, stats.tag_failures
    )?;
    checks.record("only eve's genuine messages delivered", genuine == ["genuine 1", "genuine 2"]);
    checks.record("eve's replay refused and counted", stats.replays_rejected == 1);
    checks.record("eve's tampered message refused and counted", stats.tag_failures == 1);

    // 7. Reliability: alice talks to bob through a lossy link (netsim) and loses her connection
    //    four times on purpose; every message arrives exactly once, in order.
    let proxy = Proxy::start(LOOPBACK.parse().expect("literal"), bob_addr, LinkConfig::default()).await?;
    let (lossy, at_lossy) = tokio::join!(alice.connect(proxy.local_addr(), "bob"), bob.accept());
    let (lossy, at_lossy) = (lossy?, at_lossy?);
    let mut faults = LinkConfig::default();
    (faults.loss, faults.duplicate, faults.reorder, faults.corrupt) = (0.05, 0.05, 0.4, 0.02);
    faults.jitter = Duration::from_millis(1);
    proxy.reconfigure(faults).map_err(crate::CliError::Input)?;
    const LOSSY: u32 = 2000;
    let sender = tokio::spawn({
        let lossy = lossy.clone();
        async move {
            let mut events = lossy.events();
            for i in 0..LOSSY {
                lossy.send((i % 2) as u16, &i).await?;
                if i % 500 == 250 {
                    lossy.force_reconnect();
                    while !matches!(events.recv().await, Ok(quicseal::SessionEvent::Resumed) | Err(_)) {}
                }
            }
            for ch in 0..2 {
                lossy.delivered(ch).await?;
            }
            Ok::<(), Error>(())
        }
    });
    let mut received = Vec::with_capacity(LOSSY as usize);
    let mut ordered = true;
    let mut last = [None::<u32>; 2];
    for _ in 0..LOSSY {
        let m = tokio::time::timeout(Duration::from_secs(30), at_lossy.recv())
            .await
            .map_err(|_| Error::Timeout { what: quicseal::Timed::Receipt })??;
        let v: u32 = m.decode()?;
        let ch = m.channel() as usize;
        ordered &= last[ch].is_none_or(|l| v > l);
        last[ch] = Some(v);
        received.push(v);
    }
    sender.await.map_err(|e| crate::CliError::Input(e.to_string()))??;
    let sent_stats = lossy.stats();
    let recv_stats = at_lossy.stats();
    let link = proxy.stats();
    received.sort_unstable();
    let exact = received == (0..LOSSY).collect::<Vec<_>>();
    writeln!(
        out,
        "reliable alice -> bob through a lossy link (5% loss, 5% duplication, 40% reordering, 2% corruption):"
    )?;
    writeln!(
        out,
        "         link dropped {}, duplicated {}, reordered {}, corrupted {} datagrams",
        link.lost, link.duplicated, link.reordered, link.corrupted
    )?;
    writeln!(
        out,
        "         sent {}, delivered {}, retransmitted {}, duplicates dropped {}, reconnects {}",
        sent_stats.messages_sent,
        recv_stats.messages_delivered,
        sent_stats.retransmissions,
        recv_stats.duplicates_dropped,
        sent_stats.reconnects
    )?;
    writeln!(out, "         delivered set == sent set: {exact}; order kept per channel: {ordered}")?;
    checks.record("lossy link: delivered set equals sent set, exactly once", exact);
    checks.record("lossy link: order kept per channel", ordered);
    checks.record("lossy link: 4 forced reconnects survived", sent_stats.reconnects == 4);

    // 8. RPC over the same lossy session, with a forced reconnect among the calls: every call
    //    answered, every handler run exactly once; a call past its deadline is a timeout.
    const CALLS: u64 = 200;
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let lossy = lossy.clone();
            tokio::spawn(async move {
                if i == CALLS / 2 {
                    lossy.force_reconnect();
                }
                lossy.request::<_, u64>("double", &i, Duration::from_secs(30)).await.map(|r| r == 2 * i)
            })
        })
        .collect();
    let mut answered = 0;
    for (i, call) in calls.into_iter().enumerate() {
        match call.await.map_err(|e| crate::CliError::Input(e.to_string()))? {
            Ok(right) => answered += u64::from(right),
            // Said in full, so that a rare failure here can be told from another.
            Err(e) => {
                let stats = lossy.stats();
                return Err(crate::CliError::Input(format!(
                    "rpc call {i} of {CALLS} failed: {e} (session ended: {}, reconnects {}, retransmissions {})",
                    lossy.is_ended(),
                    stats.reconnects,
                    stats.retransmissions
                )));
            }
        }
    }
    let timed_out = lossy.request::<_, ()>("slow", &(), Duration::from_millis(200)).await;
    let ran = runs.load(Ordering::Relaxed);
    writeln!(
        out,
        "rpc      alice -> bob over the lossy link: {CALLS} calls, {answered} answered correctly, handler ran {ran} times"
    )?;
    writeln!(out, "         a call to a handler slower than its 200 ms deadline: {}", describe(&timed_out))?;
    checks.record("rpc: every call answered correctly", answered == CALLS);
    checks.record("rpc: each handler ran exactly once", ran == CALLS);
    checks.record("rpc: a late call is a timeout", matches!(timed_out, Err(Error::Timeout { .. })));
    lossy.close();

    // 9. The legitimate session survived the intruders.
    to_bob.send(2, "still here").await?;
    let still = at_bob.recv().await?.decode::<String>()?;
    checks.record("alice and bob still talking after the intruders", still == "still here");

    to_bob.close();
    alice.close();
    bob.close();
    mallory.close();
    writeln!(out, "\nchecks   {}/{} passed in {:.2?}", checks.passed, checks.total, started.elapsed())?;
    for failed in &checks.failed {
        writeln!(out, "FAILED   {failed}")?;
    }
    if checks.failed.is_empty() {
        writeln!(out, "result   OK")?;
        Ok(())
    } else {
        Err(crate::CliError::Input(format!("{} demo checks failed", checks.failed.len())))
    }
}

#[derive(Default)]
struct Checks {
    total: usize,
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    fn record(&mut self, what: &str, ok: bool) {
        self.total += 1;
        if ok {
            self.passed += 1;
        } else {
            self.failed.push(what.to_owned());
        }
    }
    fn record_quiet(&mut self, ok: bool) {
        self.record("message carried the sender's identity", ok);
    }
}

fn describe<T>(r: &quicseal::Result<T>) -> String {
    match r {
        Ok(_) => "answered (unexpected!)".into(),
        Err(e) => e.to_string(),
    }
}

fn report<T>(out: &mut impl Write, who: &str, r: &quicseal::Result<T>) -> std::io::Result<()> {
    match r {
        Ok(_) => writeln!(out, "         {who}: connected (unexpected!)"),
        Err(e) => writeln!(out, "         {who}: {e}"),
    }
}

fn write_file(dir: &Path, name: &str, contents: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(dir.join(name))?;
    f.write_all(contents.as_bytes())
}

/// An insider: a plain quinn client with a valid certificate that exports the real message keys
/// from its own TLS session and sends, on channel 0: a genuine message, the same bytes again,
/// a copy of the next message with one bit flipped, then that next message.
async fn insider_replay_and_tamper(ca: &Ca, eve: &quicseal::pki::Issued, to: SocketAddr) -> String {
    match insider(ca, eve, to).await {
        Ok(()) => "sent".into(),
        Err(e) => format!("failed: {e}"),
    }
}

async fn insider(ca: &Ca, eve: &quicseal::pki::Issued, to: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    use quicseal::proto::seal::{self, ChannelSealer, EXPORTER_LABEL, KEY_MATERIAL_LEN};
    use quicseal::proto::wire::{self, MessageKind, StreamKind};
    use quicseal::rustls;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone())?;
    let chain =
        rustls::pki_types::CertificateDer::pem_slice_iter(eve.chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(eve.key_pem.as_bytes())?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![quicseal::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)?;
    let endpoint = quinn::Endpoint::client(LOOPBACK.parse()?)?;
    let conn = endpoint.connect_with(quinn::ClientConfig::new(Arc::new(quic)), to, "bob")?.await?;
    // The hello, with epoch 0xe5e.
    let epoch = 0xe5e_u64;
    let (mut control, mut control_rx) = conn.open_bi().await?;
    let mut hello = wire::encode_stream_header(StreamKind::Control).to_vec();
    wire::Frame::Hello { max_message_size: 1 << 20, epoch, resume: false, max_channels: 64, window: 2048 }
        .encode(&mut hello);
    control.write_all(&hello).await?;
    let mut answer = [0u8; wire::FRAME_HEADER_LEN + wire::HELLO_LEN as usize];
    control_rx.read_exact(&mut answer).await?;
    // The real keys, from eve's own TLS session.
    let mut material = [0u8; KEY_MATERIAL_LEN];
    conn.export_keying_material(&mut material, EXPORTER_LABEL, b"").map_err(|_| "exporter")?;
    let (key, _) = seal::derive_keys(&material, seal::Role::Dialler);
    let mut sealer = ChannelSealer::new(Arc::new(key), epoch, MessageKind::Stream, 0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    let (mut first, mut second) = (Vec::new(), Vec::new());
    sealer.seal(1, now, b"genuine 1", &mut first)?;
    sealer.seal(2, now, b"genuine 2", &mut second)?;
    let mut tampered = second.clone();
    let last = tampered.len() - 20;
    tampered[last] ^= 0x01;
    let (mut stream, _acks) = conn.open_bi().await?;
    stream.write_all(&wire::encode_stream_header(StreamKind::Channel(0))).await?;
    for frame in [&first, &first, &tampered, &second] {
        stream.write_all(frame).await?;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    conn.close(0u32.into(), b"done");
    drop(control);
    Ok(())
}

/// Dials with plain quinn and no client certificate; returns what the client saw.
async fn anonymous_dial(ca: &Ca, to: SocketAddr) -> String {
    use quicseal::rustls;
    let mut roots = rustls::RootCertStore::empty();
    if roots.add(ca.cert_der().clone()).is_err() {
        return "could not build the client".into();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(builder) =
        rustls::ClientConfig::builder_with_provider(provider).with_protocol_versions(&[&rustls::version::TLS13])
    else {
        return "could not build the client".into();
    };
    let mut cfg = builder.with_root_certificates(roots).with_no_client_auth();
    cfg.alpn_protocols = vec![quicseal::ALPN.to_vec()];
    let Ok(quic) = quinn::crypto::rustls::QuicClientConfig::try_from(cfg) else {
        return "could not build the client".into();
    };
    let Ok(endpoint) = quinn::Endpoint::client(LOOPBACK.parse().expect("literal")) else {
        return "could not bind".into();
    };
    let connecting = match endpoint.connect_with(quinn::ClientConfig::new(Arc::new(quic)), to, "bob") {
        Ok(c) => c,
        Err(e) => return format!("could not dial: {e}"),
    };
    let outcome = match connecting.await {
        Ok(conn) => conn.closed().await,
        Err(e) => e,
    };
    format!("connection closed: {outcome}")
}
