//! Shared helpers for the integration tests: a real PKI made by `quicseal::pki`, nodes on
//! loopback, and a raw quinn peer for the cases our own API refuses to produce.
#![allow(dead_code, unreachable_pub)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quicseal::pki::{Ca, Issued, KeyType, NodeCert};
use quicseal::rustls;
use quicseal::{Identity, Node, NodeConfig, Session, TrustStore};

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub struct Pki {
    pub ca: Ca,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        Pki { ca: Ca::new(name, KeyType::EcdsaP256, Duration::from_secs(24 * 3600)).unwrap() }
    }

    pub fn trust(&self) -> TrustStore {
        let mut t = TrustStore::new();
        t.add_ca_pem(self.ca.cert_pem().as_bytes()).unwrap();
        t
    }

    /// A node certificate with `name` as CN and DNS SAN, and 127.0.0.1 as IP SAN.
    pub fn cert(&self, name: &str) -> NodeCert {
        NodeCert::new(name).dns(name).ip(LOCALHOST)
    }

    pub fn issue(&self, cert: &NodeCert) -> Issued {
        self.ca.issue(cert).unwrap()
    }

    pub fn identity(&self, name: &str) -> Identity {
        to_identity(&self.issue(&self.cert(name)))
    }
}

pub fn to_identity(issued: &Issued) -> Identity {
    Identity::from_pem(issued.chain_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
}

pub fn bind(config: NodeConfig) -> Node {
    Node::bind(SocketAddr::new(LOCALHOST, 0), config).unwrap()
}

/// Binds a node on `addr`, which a node just dropped may still hold: its UDP socket (and its
/// store, if it kept one) is released once the old node's last task has let go of it, after
/// quinn drained its connections. Waits for that, a condition with a deadline, rather than for
/// a fixed time, which a loaded machine may overrun.
pub async fn bind_again(addr: SocketAddr, config: impl Fn() -> NodeConfig) -> Node {
    let bound = std::sync::Mutex::new(None);
    eventually("the address is free", || match Node::bind(addr, config()) {
        Ok(node) => {
            *bound.lock().unwrap() = Some(node);
            true
        }
        Err(e) if still_held(&e) => false,
        Err(e) => panic!("bind {addr}: {e}"),
    })
    .await;
    bound.into_inner().unwrap().expect("bound")
}

/// Whether binding failed because the last node's socket or store is not released yet.
fn still_held(e: &quicseal::Error) -> bool {
    match e {
        quicseal::Error::Io(io) => io.kind() == std::io::ErrorKind::AddrInUse,
        quicseal::Error::Store(quicseal::store::StoreError::InUse(_)) => true,
        _ => false,
    }
}

/// Dials `server` from `client` and accepts on `server`, returning both results.
pub async fn connect(
    client: &Node,
    server: &Node,
    name: &str,
) -> (quicseal::Result<Session>, quicseal::Result<Session>) {
    tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(client.connect(server.local_addr().unwrap(), name), server.accept())
    })
    .await
    .expect("connect and accept finish")
}

/// Nodes "a" and "b" with these limits, and the session "a" dialled to "b": (a, b, a's end,
/// b's end). Keep the nodes: dropping one closes its sessions.
pub async fn session_pair(pki: &Pki, a: quicseal::Limits, b: quicseal::Limits) -> (Node, Node, Session, Session) {
    let a = bind(NodeConfig::new(pki.identity("a"), pki.trust()).limits(a));
    let b = bind(NodeConfig::new(pki.identity("b"), pki.trust()).limits(b));
    let (ab, ba) = connect(&a, &b, "b").await;
    (a, b, ab.unwrap(), ba.unwrap())
}

/// A rustls client config for a raw quinn peer: trusts `pki`'s CA, presents `client` if given,
/// offers `alpn`.
pub fn raw_client_config(pki: &Pki, client: Option<&Issued>, alpn: &[u8]) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.cert_der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client {
        None => builder.with_no_client_auth(),
        Some(issued) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes()).map(|c| c.unwrap()).collect();
            let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg
}

pub fn raw_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client(SocketAddr::new(LOCALHOST, 0)).unwrap()
}

/// Dials with a raw quinn client; returns the connection once quinn's handshake finished.
pub async fn raw_connect(
    endpoint: &quinn::Endpoint,
    cfg: rustls::ClientConfig,
    to: SocketAddr,
    name: &str,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    endpoint.connect_with(quinn::ClientConfig::new(Arc::new(quic)), to, name).unwrap().await
}

/// A raw quinn peer with a certificate of `pki` named `name`, dialled to `server` (named
/// "server") with quicseal's ALPN: (its endpoint, which must outlive the connection; the
/// connection once quinn's handshake finished).
pub async fn raw_dial(pki: &Pki, server: &Node, name: &str) -> (quinn::Endpoint, quinn::Connection) {
    let issued = pki.issue(&pki.cert(name));
    let endpoint = raw_endpoint();
    let cfg = raw_client_config(pki, Some(&issued), quicseal::ALPN);
    let conn = raw_connect(&endpoint, cfg, server.local_addr().unwrap(), "server").await.unwrap();
    (endpoint, conn)
}

/// Performs the quicseal hello as a dialler on a raw connection with session epoch `epoch`;
/// returns the control stream and the acceptor's epoch.
pub async fn raw_hello_epoch(conn: &quinn::Connection, epoch: u64) -> ((quinn::SendStream, quinn::RecvStream), u64) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // Stream header (version 1, control), then HELLO: max_message_size 1 MiB, epoch.
    send.write_all(&hello_bytes(epoch)).await.unwrap();
    let mut answer = [0u8; 24];
    recv.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[..5], [0x01, 0, 0, 0, 19]);
    ((send, recv), u64::from_be_bytes(answer[9..17].try_into().unwrap()))
}

/// Control stream header and a HELLO (max_message_size 1 MiB, `epoch`, no flags, 64
/// channels, a window of 2,048).
pub fn hello_bytes(epoch: u64) -> Vec<u8> {
    let mut hello = vec![1, 0, 0, 0, 0x01, 0, 0, 0, 19, 0, 0x10, 0, 0];
    hello.extend_from_slice(&epoch.to_be_bytes());
    hello.push(0);
    hello.extend_from_slice(&64u16.to_be_bytes());
    hello.extend_from_slice(&2048u32.to_be_bytes());
    hello
}

/// [`raw_hello_epoch`] with an epoch of its own: a node retires the epochs of ended sessions by
/// the peer's names, so each raw session needs a new one.
pub async fn raw_hello(conn: &quinn::Connection) -> (quinn::SendStream, quinn::RecvStream) {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0x5eed);
    raw_hello_epoch(conn, NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)).await.0
}

/// The TLS alert a QUIC close carries, if it is a crypto error.
pub fn alert_of(e: &quinn::ConnectionError) -> Option<u8> {
    let code = match e {
        quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        quinn::ConnectionError::TransportError(t) => u64::from(t.code),
        _ => return None,
    };
    (0x100..0x200).contains(&code).then(|| (code - 0x100) as u8)
}

/// The application close code of a connection error, if any.
pub fn app_code(e: &quinn::ConnectionError) -> Option<u64> {
    match e {
        quinn::ConnectionError::ApplicationClosed(a) => Some(u64::from(a.error_code)),
        _ => None,
    }
}

/// Starts a clean netsim link in front of `server`, dials through it from `client` and accepts:
/// the link, the dialler's session and the acceptor's. (Faults are turned on afterwards with
/// `Proxy::reconfigure`, so the handshake is not slowed by lost handshake packets.)
pub async fn connect_via_proxy(
    client: &Node,
    server: &Node,
    name: &str,
) -> (quicseal::netsim::Proxy, Session, Session) {
    let proxy = quicseal::netsim::Proxy::start(
        SocketAddr::new(LOCALHOST, 0),
        server.local_addr().unwrap(),
        quicseal::netsim::LinkConfig::default(),
    )
    .await
    .unwrap();
    let (dialled, accepted) = tokio::join!(client.connect(proxy.local_addr(), name), server.accept());
    (proxy, dialled.unwrap(), accepted.unwrap())
}

/// The issue's fault mix: 5% loss, 5% duplication, 40% reordering (by up to `jitter`), 2%
/// corruption, seeded.
pub fn lossy_link(jitter: Duration, seed: u64) -> quicseal::netsim::LinkConfig {
    let mut link = quicseal::netsim::LinkConfig::default();
    link.loss = 0.05;
    link.duplicate = 0.05;
    link.reorder = 0.4;
    link.jitter = jitter;
    link.corrupt = 0.02;
    link.seed = seed;
    link
}

/// Runs the openssl CLI in `dir`; panics with its error output if it fails.
pub fn openssl(args: &[&str], dir: &std::path::Path) {
    let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// An openssl-made CA in `dir` (`ca.key`, P-256, and `ca.crt`) with subject `subject` and
/// any `-addext` extensions beyond basicConstraints and keyUsage.
pub fn openssl_ca(dir: &std::path::Path, subject: &str, extra: &[&str]) {
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"], dir);
    let mut args = vec!["req", "-x509", "-new", "-key", "ca.key", "-subj", subject, "-days", "2"];
    args.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    for e in extra {
        args.extend(["-addext", e]);
    }
    args.extend(["-out", "ca.crt"]);
    openssl(&args, dir);
}

/// Has the openssl CA in `dir` sign `NAME.crt` for the key `NAME.key`, with subject `subject`
/// and the extensions in the file `ext`.
pub fn openssl_sign(dir: &std::path::Path, name: &str, subject: &str, ext: &str) {
    let (key, csr, crt) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
    openssl(&["req", "-new", "-key", &key, "-subj", subject, "-out", &csr], dir);
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            ext,
            "-out",
            &crt,
        ],
        dir,
    );
}

/// Waits until `done` holds, checking every 10 ms, at most 20 s (then panics naming `what`):
/// for state that has no notification to wait on (a node's identity after a reload...).
pub async fn eventually(what: &str, done: impl Fn() -> bool) {
    let checked = tokio::time::timeout(Duration::from_secs(20), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await; // a condition wait's poll interval
        }
    });
    checked.await.unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

/// The text of our own TLS refusal (panics on any other error).
pub fn refusal(e: quicseal::Error) -> String {
    match &e {
        quicseal::Error::Tls(quicseal::TlsError::Local { .. }) => e.to_string(),
        other => panic!("expected our own TLS refusal, got {other:?}"),
    }
}

/// Sends 0, 1, 2... (`u32`) on channel 0 of `session`, one every `every`, until sending fails
/// or the task is aborted: messages flowing while something else happens.
pub fn trickle(session: &Session, every: Duration) -> tokio::task::JoinHandle<()> {
    let session = session.clone();
    tokio::spawn(async move {
        let mut n = 0u32;
        while session.send(0, &n).await.is_ok() {
            n += 1;
            tokio::time::sleep(every).await; // pacing: a steady trickle
        }
    })
}

/// Receives what [`trickle`] sends, checking each arrives once and in order, until the session
/// ends; returns how many arrived.
pub fn receive_in_order(session: &Session) -> tokio::task::JoinHandle<u32> {
    let session = session.clone();
    tokio::spawn(async move {
        let mut expected = 0u32;
        while let Ok(m) = session.recv().await {
            assert_eq!(m.decode::<u32>().unwrap(), expected, "in order, each once");
            expected += 1;
        }
        expected
    })
}
