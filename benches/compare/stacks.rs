//! The three stacks, each as a connected pair with the operations the workloads need, and
//! the workloads that run on a stack of their own (handshakes, loss, memory).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quicseal::pki::{Ca, Issued, KeyType, NodeCert};
use quicseal::{ApplicationError, CallOptions, Identity, Limits, Node, NodeConfig, Router, TrustStore};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::sync::{Mutex, oneshot};

pub(crate) const ALPN: &[u8] = b"quicseal-bench";

pub(crate) struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    pub(crate) server: Issued,
    pub(crate) client: Issued,
}

/// The files [`Pki::save`] writes, in order: CA certificate, then chain and key of the server
/// and of the client.
const PKI_FILES: [&str; 5] = ["ca.pem", "server.pem", "server.key", "client.pem", "client.key"];

impl Pki {
    pub(crate) fn new() -> Pki {
        let ca = Ca::new("bench CA", KeyType::EcdsaP256, Duration::from_secs(3600)).unwrap();
        let server = ca.issue(&NodeCert::new("server").dns("server")).unwrap();
        let client = ca.issue(&NodeCert::new("client").dns("client")).unwrap();
        Pki { ca_pem: ca.cert_pem().to_owned(), ca_der: ca.cert_der().clone(), server, client }
    }
    /// Writes the certificates and keys to `dir`, for the benchmark's other processes.
    pub(crate) fn save(&self, dir: &std::path::Path) {
        std::fs::create_dir_all(dir).unwrap();
        let parts =
            [&self.ca_pem, &self.server.chain_pem, &self.server.key_pem, &self.client.chain_pem, &self.client.key_pem];
        for (name, text) in PKI_FILES.iter().zip(parts) {
            std::fs::write(dir.join(name), text).unwrap();
        }
    }
    /// Reads what [`Pki::save`] wrote.
    pub(crate) fn load(dir: &std::path::Path) -> Pki {
        let [ca_pem, server_chain, server_key, client_chain, client_key] =
            PKI_FILES.map(|name| std::fs::read_to_string(dir.join(name)).unwrap());
        let issued = |chain_pem: String, key_pem: String| Issued {
            cert_der: CertificateDer::pem_slice_iter(chain_pem.as_bytes()).next().unwrap().unwrap(),
            chain_pem,
            key_pem,
            serial: Vec::new(),
        };
        let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap();
        Pki { ca_pem, ca_der, server: issued(server_chain, server_key), client: issued(client_chain, client_key) }
    }
    pub(crate) fn trust(&self) -> TrustStore {
        let mut t = TrustStore::new();
        t.add_ca_pem(self.ca_pem.as_bytes()).unwrap();
        t
    }
    pub(crate) fn identity(i: &Issued) -> Identity {
        Identity::from_pem(i.chain_pem.as_bytes(), i.key_pem.as_bytes()).unwrap()
    }
    fn chain(i: &Issued) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let chain = CertificateDer::pem_slice_iter(i.chain_pem.as_bytes()).map(|c| c.unwrap()).collect();
        (chain, PrivateKeyDer::from_pem_slice(i.key_pem.as_bytes()).unwrap())
    }
    fn roots(&self) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        Arc::new(roots)
    }
    /// Mutual TLS 1.3 on ring, no resumption, no early data: the same policy as quicseal.
    fn server_tls(&self) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots(), provider.clone())
            .build()
            .unwrap();
        let (chain, key) = Pki::chain(&self.server);
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        cfg.send_tls13_tickets = 0;
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg
    }
    fn client_tls(&self) -> rustls::ClientConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (chain, key) = Pki::chain(&self.client);
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(self.roots())
            .with_client_auth_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        cfg.resumption = rustls::client::Resumption::disabled();
        cfg
    }
}

pub(crate) fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// The three stacks, each as "a connected pair" with the operations the workloads need.

/// One message stream, one way, with an end-to-end confirmation per message from the receiving
/// application (the receiver confirms cumulatively).
pub(crate) trait Pair {
    /// Sends `count` messages of `size` bytes, keeping at most `window` unconfirmed; returns when
    /// the receiver confirmed the last one. `coalesce`: the baselines gather frames into 64 KiB
    /// writes instead of one `write_all` per frame (quicseal decides for itself).
    async fn stream(&mut self, count: usize, size: usize, window: usize, coalesce: bool) -> Duration;
    /// `calls` RPC round trips of `size` bytes at concurrency `concurrency`; latencies.
    async fn rpc(&mut self, calls: usize, size: usize, concurrency: usize) -> Vec<Duration>;
}

// --- quicseal -------------------------------------------------------------------------------

pub(crate) struct Quicseal {
    pub(crate) server: Node,
    pub(crate) client: Node,
    to_server: quicseal::Session,
    at_server: quicseal::Session,
}

impl Quicseal {
    pub(crate) async fn new(pki: &Pki) -> Quicseal {
        let router = Router::new().handle_bytes("echo", |_call, body| async move { Ok::<_, ApplicationError>(body) });
        let server =
            Node::bind(loopback(), NodeConfig::new(Pki::identity(&pki.server), pki.trust()).rpc(router)).unwrap();
        let client = Node::bind(loopback(), NodeConfig::new(Pki::identity(&pki.client), pki.trust())).unwrap();
        let (to_server, at_server) =
            tokio::join!(client.connect(server.local_addr().unwrap(), "server"), server.accept());
        Quicseal { server, client, to_server: to_server.unwrap(), at_server: at_server.unwrap() }
    }
}

impl Pair for Quicseal {
    /// With `coalesce` (the baselines gather their writes by hand), the receiver takes what is
    /// ready in batches (`recv_many`), the best a quicseal user can do; quicseal's sender
    /// decides its writes itself either way.
    async fn stream(&mut self, count: usize, size: usize, window: usize, coalesce: bool) -> Duration {
        let payload = Bytes::from(vec![7u8; size]);
        let receiver = self.at_server.clone();
        let reader = tokio::spawn(async move {
            if coalesce {
                let (mut batch, mut got) = (Vec::with_capacity(window), 0);
                while got < count {
                    batch.clear();
                    got += receiver.recv_many(&mut batch, window).await.unwrap();
                }
            } else {
                for _ in 0..count {
                    receiver.recv().await.unwrap();
                }
            }
        });
        let start = Instant::now();
        let mut seqs = std::collections::VecDeque::with_capacity(window);
        for _ in 0..count {
            if seqs.len() == window {
                let oldest = seqs.pop_front().unwrap();
                self.to_server.wait_acked(1, oldest).await.unwrap();
            }
            seqs.push_back(self.to_server.send_bytes(1, payload.clone()).await.unwrap());
        }
        self.to_server.delivered(1).await.unwrap();
        let elapsed = start.elapsed();
        reader.await.unwrap();
        elapsed
    }

    async fn rpc(&mut self, calls: usize, size: usize, concurrency: usize) -> Vec<Duration> {
        let body = Bytes::from(vec![1u8; size]);
        let session = self.to_server.clone();
        closed_loop(calls, concurrency, move || {
            let (session, body) = (session.clone(), body.clone());
            async move {
                let r = session.request_bytes("echo", body, CallOptions::new(Duration::from_secs(30))).await.unwrap();
                assert_eq!(r.len(), size);
            }
        })
        .await
    }
}

// --- raw quinn ------------------------------------------------------------------------------

pub(crate) struct RawQuinn {
    _server: quinn::Endpoint,
    pub(crate) client: quinn::Endpoint,
    conn: quinn::Connection,
}

pub(crate) fn quinn_server(pki: &Pki) -> quinn::Endpoint {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(pki.server_tls()).unwrap();
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(Limits::default().quinn_transport()));
    cfg.migration(false);
    quinn_endpoint(Some(cfg))
}

/// A raw quinn endpoint on loopback, with the same UDP socket buffers as a quicseal node
/// (`Limits::udp_socket_buffer`): the size a user running many connections on one socket would
/// choose.
pub(crate) fn quinn_endpoint(server: Option<quinn::ServerConfig>) -> quinn::Endpoint {
    let socket = std::net::UdpSocket::bind(loopback()).unwrap();
    let buffer = Limits::default().udp_socket_buffer;
    let s = socket2::SockRef::from(&socket);
    s.set_recv_buffer_size(buffer).unwrap();
    s.set_send_buffer_size(buffer).unwrap();
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, Arc::new(quinn::TokioRuntime)).unwrap()
}

pub(crate) fn quinn_client_config(pki: &Pki) -> quinn::ClientConfig {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(pki.client_tls()).unwrap();
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(Limits::default().quinn_transport()));
    cfg
}

/// The raw quinn server: a bidirectional stream is either a message stream (first byte 0:
/// length-prefixed frames in, a cumulative u64 confirmation out every time it read some) or
/// one RPC call (first byte 1: request in, the same bytes back).
pub(crate) fn serve_quinn(endpoint: quinn::Endpoint) {
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(quinn_stream(send, recv));
                }
            });
        }
    });
}

pub(crate) async fn quinn_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut kind = [0u8; 1];
    if recv.read_exact(&mut kind).await.is_err() {
        return;
    }
    if kind[0] == 1 {
        let Ok(req) = recv.read_to_end(1 << 20).await else { return };
        let _ = send.write_all(&req).await;
        let _ = send.finish();
        return;
    }
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let mut len = [0u8; 4];
        if recv.read_exact(&mut len).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes(len) as usize;
        if recv.read_exact(&mut buf[..len]).await.is_err() {
            return;
        }
        got += 1;
        // Confirm when nothing more is buffered right now (cumulative).
        if send.write_all(&got.to_be_bytes()).await.is_err() {
            return;
        }
    }
}

impl RawQuinn {
    pub(crate) async fn new(pki: &Pki) -> RawQuinn {
        let server = quinn_server(pki);
        let addr = server.local_addr().unwrap();
        serve_quinn(server.clone());
        let mut client = quinn_endpoint(None);
        client.set_default_client_config(quinn_client_config(pki));
        let conn = client.connect(addr, "server").unwrap().await.unwrap();
        RawQuinn { _server: server, client, conn }
    }
}

/// Sends length-prefixed frames on `send`, keeping at most `window` unconfirmed; reads cumulative
/// u64 confirmations from `recv`. Each frame is one `write_all`, or with `coalesce` frames are
/// gathered into writes of up to 64 KiB; one flush per batch either way.
pub(crate) async fn framed_stream<W, R>(
    send: &mut W,
    recv: &mut R,
    count: usize,
    size: usize,
    window: usize,
    coalesce: bool,
) -> Duration
where
    W: tokio::io::AsyncWrite + Unpin,
    R: tokio::io::AsyncRead + Unpin,
{
    let payload = vec![7u8; size];
    let start = Instant::now();
    let (mut sent, mut confirmed) = (0usize, 0usize);
    let mut batch = Vec::with_capacity(64 * 1024 + size + 4);
    while confirmed < count {
        let mut wrote = false;
        while sent < count && sent - confirmed < window && batch.len() < 64 * 1024 {
            batch.extend_from_slice(&(size as u32).to_be_bytes());
            batch.extend_from_slice(&payload);
            sent += 1;
            if !coalesce {
                send.write_all(&batch).await.unwrap();
                batch.clear();
                wrote = true;
            }
        }
        if !batch.is_empty() {
            send.write_all(&batch).await.unwrap();
            batch.clear();
            wrote = true;
        }
        if wrote {
            send.flush().await.unwrap();
        }
        if sent - confirmed >= window || sent == count {
            let mut c = [0u8; 8];
            recv.read_exact(&mut c).await.unwrap();
            confirmed = u64::from_be_bytes(c) as usize;
        }
    }
    start.elapsed()
}

impl Pair for RawQuinn {
    async fn stream(&mut self, count: usize, size: usize, window: usize, coalesce: bool) -> Duration {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        send.write_all(&[0]).await.unwrap();
        let d = framed_stream(&mut send, &mut recv, count, size, window, coalesce).await;
        let _ = send.finish();
        d
    }

    async fn rpc(&mut self, calls: usize, size: usize, concurrency: usize) -> Vec<Duration> {
        let conn = self.conn.clone();
        let body = vec![1u8; size];
        closed_loop(calls, concurrency, move || {
            let (conn, body) = (conn.clone(), body.clone());
            async move {
                let (mut send, mut recv) = conn.open_bi().await.unwrap();
                let mut req = Vec::with_capacity(body.len() + 1);
                req.push(1);
                req.extend_from_slice(&body);
                send.write_all(&req).await.unwrap();
                send.finish().unwrap();
                let r = recv.read_to_end(1 << 20).await.unwrap();
                assert_eq!(r.len(), size);
            }
        })
        .await
    }
}

// --- TLS over TCP ---------------------------------------------------------------------------

type TlsServerStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
type TlsClientStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

pub(crate) struct Tcp {
    addr: SocketAddr,
    connector: tokio_rustls::TlsConnector,
}

/// The TCP server: each connection starts with a kind byte, as for raw quinn. Message streams
/// are confirmed cumulatively; RPC connections carry `[id u32][len u32][body]` frames both ways.
pub(crate) async fn serve_tcp(listener: tokio::net::TcpListener, acceptor: tokio_rustls::TlsAcceptor) {
    while let Ok((tcp, _)) = listener.accept().await {
        tcp.set_nodelay(true).unwrap();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            tcp_conn(tls).await;
        });
    }
}

pub(crate) async fn tcp_conn(tls: TlsServerStream) {
    let (rd, wr) = tokio::io::split(tls);
    let mut rd = tokio::io::BufReader::with_capacity(128 * 1024, rd);
    let mut wr = BufWriter::new(wr);
    let mut kind = [0u8; 1];
    if rd.read_exact(&mut kind).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let mut head = [0u8; 8];
        let head_len = if kind[0] == 1 { 8 } else { 4 };
        if rd.read_exact(&mut head[..head_len]).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes(head[head_len - 4..head_len].try_into().unwrap()) as usize;
        if rd.read_exact(&mut buf[..len]).await.is_err() {
            return;
        }
        if kind[0] == 1 {
            // Echo the call back.
            let _ = wr.write_all(&head).await;
            let _ = wr.write_all(&buf[..len]).await;
        } else {
            got += 1;
            let _ = wr.write_all(&got.to_be_bytes()).await;
        }
        // Answer in one write once everything already received is handled.
        if rd.buffer().is_empty() && wr.flush().await.is_err() {
            return;
        }
    }
}

impl Tcp {
    pub(crate) async fn new(pki: &Pki) -> Tcp {
        let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_tcp(listener, tokio_rustls::TlsAcceptor::from(Arc::new(pki.server_tls()))));
        Tcp { addr, connector: tokio_rustls::TlsConnector::from(Arc::new(pki.client_tls())) }
    }

    async fn connect(&self, kind: u8) -> TlsClientStream {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("server").unwrap();
        let mut tls = self.connector.connect(name, tcp).await.unwrap();
        tls.write_all(&[kind]).await.unwrap();
        tls
    }
}

impl Pair for Tcp {
    async fn stream(&mut self, count: usize, size: usize, window: usize, coalesce: bool) -> Duration {
        let tls = self.connect(0).await;
        let (mut rd, wr) = tokio::io::split(tls);
        let mut wr = BufWriter::with_capacity(128 * 1024, wr);
        framed_stream(&mut wr, &mut rd, count, size, window, coalesce).await
    }

    async fn rpc(&mut self, calls: usize, size: usize, concurrency: usize) -> Vec<Duration> {
        // One connection, calls multiplexed by id (as an RPC library over TCP does).
        let tls = self.connect(1).await;
        let (mut rd, wr) = tokio::io::split(tls);
        let wr = Arc::new(Mutex::new(BufWriter::new(wr)));
        let pending: Arc<std::sync::Mutex<HashMap<u32, oneshot::Sender<usize>>>> = Arc::default();
        let reader = tokio::spawn({
            let pending = pending.clone();
            async move {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let mut head = [0u8; 8];
                    if rd.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let id = u32::from_be_bytes(head[..4].try_into().unwrap());
                    let len = u32::from_be_bytes(head[4..].try_into().unwrap()) as usize;
                    rd.read_exact(&mut buf[..len]).await.unwrap();
                    if let Some(tx) = pending.lock().unwrap().remove(&id) {
                        let _ = tx.send(len);
                    }
                }
            }
        });
        let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let body = vec![1u8; size];
        let lat = closed_loop(calls, concurrency, move || {
            let (wr, pending, next, body) = (wr.clone(), pending.clone(), next.clone(), body.clone());
            async move {
                let id = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                pending.lock().unwrap().insert(id, tx);
                {
                    let mut w = wr.lock().await;
                    w.write_all(&id.to_be_bytes()).await.unwrap();
                    w.write_all(&(body.len() as u32).to_be_bytes()).await.unwrap();
                    w.write_all(&body).await.unwrap();
                    w.flush().await.unwrap();
                }
                assert_eq!(rx.await.unwrap(), size);
            }
        })
        .await;
        reader.abort();
        lat
    }
}

/// Runs `calls` calls of `one()` with `concurrency` callers in a closed loop; the latency of
/// each.
pub(crate) async fn closed_loop<F, Fut>(calls: usize, concurrency: usize, one: F) -> Vec<Duration>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let per = calls / concurrency;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let one = one.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for _ in 0..per {
                    let t = Instant::now();
                    one().await;
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::with_capacity(calls);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

// ---------------------------------------------------------------------------------------------
// Handshakes (W4): a new connection, authenticated both ways, plus its first message confirmed.

pub(crate) async fn handshake_quicseal(pki: &Pki, n: usize) -> Duration {
    // One client identity makes every connection, each closed before the next: a closed one may
    // still be counted at the server when the next arrives.
    let mut limits = Limits::default();
    limits.max_connections_per_peer = n + 16;
    let server =
        Node::bind(loopback(), NodeConfig::new(Pki::identity(&pki.server), pki.trust()).limits(limits)).unwrap();
    let client = Node::bind(loopback(), NodeConfig::new(Pki::identity(&pki.client), pki.trust())).unwrap();
    let addr = server.local_addr().unwrap();
    let acceptor = server.clone(); // the server stays open until the last message is confirmed
    let accept = tokio::spawn(async move {
        for _ in 0..n {
            let s = acceptor.accept().await.unwrap();
            s.recv().await.unwrap();
            tokio::spawn(async move { s.closed().await });
        }
    });
    let start = Instant::now();
    for _ in 0..n {
        // The first message leaves right behind the HELLO, as `quicseal send` sends it.
        let (s, _) = client.connect_and_send_bytes(addr, "server", 0, &b"hi"[..]).await.unwrap();
        s.delivered(0).await.unwrap();
        s.close();
    }
    let d = start.elapsed();
    accept.await.unwrap();
    drop(server);
    d
}

pub(crate) async fn handshake_quinn(pki: &Pki, n: usize) -> Duration {
    let server = quinn_server(pki);
    let addr = server.local_addr().unwrap();
    serve_quinn(server.clone());
    let mut client = quinn_endpoint(None);
    client.set_default_client_config(quinn_client_config(pki));
    let start = Instant::now();
    for _ in 0..n {
        let conn = client.connect(addr, "server").unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[0, 0, 0, 0, 2, b'h', b'i']).await.unwrap();
        let mut c = [0u8; 8];
        recv.read_exact(&mut c).await.unwrap();
        conn.close(0u32.into(), b"");
    }
    start.elapsed()
}

pub(crate) async fn handshake_tcp(tcp: &Tcp, n: usize) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        let mut tls = tcp.connect(0).await;
        tls.write_all(&[0, 0, 0, 2, b'h', b'i']).await.unwrap();
        let mut c = [0u8; 8];
        tls.read_exact(&mut c).await.unwrap();
    }
    start.elapsed()
}

// ---------------------------------------------------------------------------------------------
// Loss (W5): goodput of a one-way transfer through the netsim link, quicseal vs raw quinn.

pub(crate) fn lossy(loss: f64, seed: u64) -> quicseal::netsim::LinkConfig {
    let mut link = quicseal::netsim::LinkConfig::default();
    link.loss = loss;
    link.seed = seed;
    link
}

pub(crate) async fn lossy_quicseal(pki: &Pki, loss: f64, mib: usize) -> Duration {
    let server = Node::bind(loopback(), NodeConfig::new(Pki::identity(&pki.server), pki.trust())).unwrap();
    let client = Node::bind(loopback(), NodeConfig::new(Pki::identity(&pki.client), pki.trust())).unwrap();
    let proxy =
        quicseal::netsim::Proxy::start(loopback(), server.local_addr().unwrap(), Default::default()).await.unwrap();
    let (to, at) = tokio::join!(client.connect(proxy.local_addr(), "server"), server.accept());
    let (to, at) = (to.unwrap(), at.unwrap());
    proxy.reconfigure(lossy(loss, 7)).unwrap();
    let mut pair = Quicseal { server, client, to_server: to, at_server: at };
    pair.stream(mib * 16, 64 * 1024, 64, true).await
}

pub(crate) async fn lossy_quinn(pki: &Pki, loss: f64, mib: usize) -> Duration {
    let server = quinn_server(pki);
    serve_quinn(server.clone());
    let proxy =
        quicseal::netsim::Proxy::start(loopback(), server.local_addr().unwrap(), Default::default()).await.unwrap();
    let mut client = quinn_endpoint(None);
    client.set_default_client_config(quinn_client_config(pki));
    let conn = client.connect(proxy.local_addr(), "server").unwrap().await.unwrap();
    proxy.reconfigure(lossy(loss, 7)).unwrap();
    let mut pair = RawQuinn { _server: server, client, conn };
    pair.stream(mib * 16, 64 * 1024, 64, true).await
}

// ---------------------------------------------------------------------------------------------
// Memory (W6): resident memory per idle session, each stack measured in a fresh process.

pub(crate) fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// In a child process: opens `n` idle sessions (both ends in this process) and prints the
/// resident memory they added, per session.
pub(crate) async fn memory_child(stack: &str, n: usize) {
    let pki = Pki::new();
    let mut limits = Limits::default();
    limits.max_connections = n + 16;
    // Every session comes from the same client identity here.
    limits.max_connections_per_peer = n + 16;
    let before = rss_bytes();
    let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();
    match stack {
        "quicseal" => {
            let server =
                Node::bind(loopback(), NodeConfig::new(Pki::identity(&pki.server), pki.trust()).limits(limits.clone()))
                    .unwrap();
            let client =
                Node::bind(loopback(), NodeConfig::new(Pki::identity(&pki.client), pki.trust()).limits(limits))
                    .unwrap();
            let addr = server.local_addr().unwrap();
            for _ in 0..n {
                let (a, b) = tokio::join!(client.connect(addr, "server"), server.accept());
                keep.push(Box::new((a.unwrap(), b.unwrap())));
            }
            keep.push(Box::new((server, client)));
        }
        _ => {
            let server = quinn_server(&pki);
            let addr = server.local_addr().unwrap();
            let mut client = quinn_endpoint(None);
            client.set_default_client_config(quinn_client_config(&pki));
            for _ in 0..n {
                let (a, b) = tokio::join!(async { client.connect(addr, "server").unwrap().await.unwrap() }, async {
                    server.accept().await.unwrap().await.unwrap()
                });
                keep.push(Box::new((a, b)));
            }
            keep.push(Box::new((server, client)));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes();
    println!("{}", (after.saturating_sub(before)) as f64 / n as f64 / 1024.0);
    drop(keep);
}

pub(crate) fn memory_of(stack: &str, n: usize) -> f64 {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--memory-child", stack, &n.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}
