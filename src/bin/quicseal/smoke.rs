//! `quicseal listen` and `quicseal send`: how an operator checks that certificates (made by
//! any standard tool) and connectivity work.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use quicseal::{CertFiles, Error, Fingerprint, Limits, Node, NodeConfig, Policy};
use serde_json::json;

use crate::args;

/// Options shared by `listen` and `send`.
#[derive(clap::Args, Debug)]
pub(crate) struct Tls {
    /// This node's certificate chain (PEM, leaf first).
    #[cfg_attr(feature = "workload-api", arg(long, required_unless_present = "workload_api"))]
    #[cfg_attr(not(feature = "workload-api"), arg(long, required = true))]
    cert: Option<PathBuf>,
    /// This node's private key (PEM: PKCS#8, SEC1 or PKCS#1).
    #[cfg_attr(feature = "workload-api", arg(long, required_unless_present = "workload_api"))]
    #[cfg_attr(not(feature = "workload-api"), arg(long, required = true))]
    key: Option<PathBuf>,
    /// CA certificate(s) to trust (PEM).
    #[cfg_attr(feature = "workload-api", arg(long, required_unless_present = "workload_api"))]
    #[cfg_attr(not(feature = "workload-api"), arg(long, required = true))]
    ca: Option<PathBuf>,
    /// Take this node's SVID and trust bundles from the SPIFFE Workload API instead of files,
    /// and follow their rotation: at ENDPOINT (unix:///path/to/agent.sock or tcp://IP:PORT),
    /// or, given without a value, at the one in SPIFFE_ENDPOINT_SOCKET.
    #[cfg(feature = "workload-api")]
    #[arg(
        long,
        value_name = "ENDPOINT",
        num_args = 0..=1,
        default_missing_value = "",
        conflicts_with_all = ["cert", "key", "ca", "crl", "bundle"]
    )]
    workload_api: Option<String>,
    /// Certificate revocation list(s) (PEM), repeatable.
    #[arg(long)]
    crl: Vec<PathBuf>,
    /// A SPIFFE trust bundle, repeatable: peers whose SPIFFE ID is in DOMAIN must chain to the
    /// CAs in FILE, and to nothing else (federation).
    #[arg(long, value_name = "DOMAIN=FILE")]
    bundle: Vec<String>,
    /// Only allow these peers (repeatable; default: any peer with a certificate from the CA):
    /// a DNS/IP/URI SAN or CN (`db-1`, `10.0.0.1`, `spiffe://td/node/a`), a whole SPIFFE
    /// trust domain (`spiffe://td`), or a key fingerprint (`key:HEX`, as `cert inspect` shows).
    #[arg(long)]
    allow: Vec<String>,
    /// Print JSON lines instead of text (one object per event).
    #[arg(long)]
    json: bool,
}

/// Which role a node takes in `listen` or `send`: what its certificate must allow.
#[derive(Clone, Copy, PartialEq)]
enum CliRole {
    Listener,
    Sender,
}

/// Where a node's TLS material comes from, and is followed from.
enum Source {
    Files(CertFiles),
    #[cfg(feature = "workload-api")]
    WorkloadApi(quicseal::workload_api::WorkloadApi),
}

impl Source {
    /// Keeps `node` on the latest material until the returned watcher is dropped.
    fn follow(&self, node: &Node) -> quicseal::CertWatcher {
        match self {
            Source::Files(files) => node.watch(files.clone()),
            #[cfg(feature = "workload-api")]
            Source::WorkloadApi(api) => node.follow(api),
        }
    }
}

impl Tls {
    fn files(&self) -> crate::Result<CertFiles> {
        let (Some(cert), Some(key), Some(ca)) = (&self.cert, &self.key, &self.ca) else {
            return Err(crate::CliError::Input("give --cert, --key and --ca".into()));
        };
        let files = self.crl.iter().fold(CertFiles::new(cert, key, ca), |f, crl| f.crl(crl));
        self.bundle.iter().try_fold(files, |f, b| match b.split_once('=') {
            Some((domain, file)) if !domain.is_empty() && !file.is_empty() => Ok(f.bundle(domain, file)),
            _ => Err(crate::CliError::Input(format!("--bundle {b:?}: give DOMAIN=FILE, e.g. example.org=bundle.pem"))),
        })
    }

    fn policy(&self) -> crate::Result<Policy> {
        if self.allow.is_empty() {
            return Ok(Policy::any_authenticated());
        }
        self.allow.iter().try_fold(Policy::allow_list(), |p, rule| {
            if let Some(hex) = rule.strip_prefix("key:") {
                let fp: Fingerprint = hex.parse().map_err(|_| {
                    crate::CliError::Input(format!(
                        "--allow {rule}: not a key fingerprint (64 hex digits, as `cert inspect` shows)"
                    ))
                })?;
                Ok(p.allow_fingerprint(fp))
            } else if let Some(domain) = rule.strip_prefix("spiffe://").filter(|d| !d.contains('/')) {
                if domain.is_empty() {
                    return Err(crate::CliError::Input(
                        "--allow spiffe://: give a trust domain, e.g. spiffe://example.org".into(),
                    ));
                }
                Ok(p.allow_spiffe_trust_domain(domain))
            } else if rule.is_empty() {
                Err(crate::CliError::Input("--allow \"\": give a name, spiffe://DOMAIN or key:FINGERPRINT".into()))
            } else {
                Ok(p.allow_name(rule))
            }
        })
    }

    /// Where the material comes from: the Workload API if asked (connecting to it), else the
    /// files.
    async fn source(&self) -> crate::Result<Source> {
        #[cfg(feature = "workload-api")]
        if let Some(endpoint) = &self.workload_api {
            let endpoint = Some(endpoint.as_str()).filter(|e| !e.is_empty());
            return Ok(Source::WorkloadApi(quicseal::workload_api::WorkloadApi::connect(endpoint).await?));
        }
        Ok(Source::Files(self.files()?))
    }

    /// Loads the material, refuses a certificate that cannot work in `role`, and builds the
    /// node configuration; returns it with where the material is followed from.
    async fn config(&self, role: CliRole, limits: Limits) -> crate::Result<(NodeConfig, Source)> {
        let source = self.source().await?;
        let (identity, trust, what) = match &source {
            Source::Files(files) => {
                let (identity, trust) = files.load()?;
                (identity, trust, files.cert.display().to_string())
            }
            #[cfg(feature = "workload-api")]
            Source::WorkloadApi(api) => {
                let (identity, trust) = api.material()?;
                (identity, trust, format!("the SVID of {} from the Workload API", api.spiffe_id()?))
            }
        };
        startup_checks(&what, &identity.chain()[0], role)?;
        Ok((NodeConfig::new(identity, trust).policy(self.policy()?).limits(limits), source))
    }
}

/// Refuses to start with a certificate that cannot work: a CA certificate, one that is expired
/// or not valid yet, or one whose extended key usage does not allow the role (a listener needs
/// `serverAuth`, a sender `clientAuth`). (The node itself warns when it or a CA expires within
/// 30 days.)
fn startup_checks(file: &str, leaf: &[u8], role: CliRole) -> crate::Result<()> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| crate::CliError::Input(format!("{file}: the certificate does not parse: {e}")))?;
    if cert.is_ca() {
        return Err(crate::CliError::Input(format!(
            "{file} is a CA certificate: a node presents a node certificate issued by the CA \
             (`quicseal cert issue NODE`)"
        )));
    }
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let validity = cert.validity();
    if validity.not_after.timestamp() <= now {
        return Err(crate::CliError::Input(format!(
            "{file} expired on {}: renew it (`quicseal cert renew {file}`)",
            validity.not_after
        )));
    }
    if validity.not_before.timestamp() > now {
        return Err(crate::CliError::Input(format!(
            "{file} is not valid before {} (check this machine's clock)",
            validity.not_before
        )));
    }
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        let (allowed, needed, flag) = match role {
            CliRole::Listener => (eku.value.server_auth || eku.value.any, "serverAuth", "--client-only"),
            CliRole::Sender => (eku.value.client_auth || eku.value.any, "clientAuth", "--server-only"),
        };
        if !allowed {
            let what = if role == CliRole::Listener { "accept sessions" } else { "dial" };
            return Err(crate::CliError::Input(format!(
                "{file} cannot {what}: its extended key usage lacks {needed} (issued with {flag}?)"
            )));
        }
    }
    Ok(())
}

/// `quicseal listen`.
#[derive(clap::Args, Debug)]
#[command(after_help = "The certificate, key, CA and CRL files are watched (checked every 5 s) and reloaded when \
                        they change: a certificate revoked in a new CRL is refused from then on, without a \
                        restart; files that cannot be used are reported and the last good ones kept. With \
                        --workload-api (builds with the feature workload-api), each SVID and bundle the \
                        agent rotates in is taken the same way.")]
pub(crate) struct ListenArgs {
    #[command(flatten)]
    tls: Tls,
    /// UDP address to listen on (IP:PORT or HOST:PORT).
    #[arg(long, default_value = "127.0.0.1:4433", value_parser = args::address)]
    bind: SocketAddr,
    /// Exit after printing this many messages (default: run until killed).
    #[arg(long)]
    count: Option<u64>,
    /// Serve the node's counters in the Prometheus text format over HTTP at this TCP address.
    #[arg(long, value_parser = args::address)]
    metrics: Option<SocketAddr>,
}

/// `quicseal send`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Exit codes: 0 the listener's application took the message; 1 bad input (arguments, \
                        files, certificate); 2 the TLS handshake was refused (by either side: unknown CA, \
                        expired, revoked, wrong name or usage); 3 an authorization policy refused the \
                        session (either side); 4 no node answered, or the listener refused the connection \
                        before the handshake; 5 sent, but its receipt did not arrive in time.")]
pub(crate) struct SendArgs {
    #[command(flatten)]
    tls: Tls,
    /// The listener's UDP address (IP:PORT or HOST:PORT).
    #[arg(long, value_parser = args::address)]
    to: SocketAddr,
    /// The name the listener's certificate must prove: a DNS name or IP address (a SAN), or a
    /// SPIFFE ID (spiffe://trust-domain/path: the certificate must be an X.509-SVID for it).
    #[arg(long)]
    name: String,
    /// Channel to send on.
    #[arg(long, default_value_t = 0)]
    channel: u16,
    /// Give up after this many seconds (handshake, then the receipt).
    #[arg(long, default_value = "10", value_parser = args::seconds)]
    timeout: Duration,
    /// The message (sent as UTF-8 bytes); `-` reads it from standard input.
    message: String,
}

pub(crate) async fn listen(args: ListenArgs, out: &mut impl Write) -> crate::Result<()> {
    let tls = &args.tls;
    let (config, source) = tls.config(CliRole::Listener, Limits::default()).await?;
    let node = Node::bind(args.bind, config)?;
    let _watcher = source.follow(&node);
    let addr = node.local_addr()?;
    if tls.json {
        writeln!(out, "{}", json!({"event": "listening", "address": addr.to_string()}))?;
    } else {
        writeln!(out, "listening on {addr}")?;
    }
    let _scrape = match args.metrics {
        Some(at) => {
            let (bound, task) = crate::scrape::serve(&node, at).await?;
            if tls.json {
                writeln!(out, "{}", json!({"event": "metrics", "address": bound.to_string()}))?;
            } else {
                writeln!(out, "metrics on http://{bound}/metrics")?;
            }
            Some(AbortOnDrop(task))
        }
        None => None,
    };
    out.flush()?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(64);
    let mut printed = 0u64;
    loop {
        tokio::select! {
            accepted = node.accept() => match accepted {
                Ok(session) => {
                    let (tx, json) = (tx.clone(), tls.json);
                    tokio::spawn(async move {
                        while let Ok(m) = session.recv().await {
                            let line = if json {
                                json!({
                                    "event": "message",
                                    "peer": m.peer().display_name(),
                                    "fingerprint": m.peer().fingerprint.to_string(),
                                    "channel": m.channel(),
                                    "seq": m.seq(),
                                    "text": String::from_utf8_lossy(m.payload()),
                                    "bytes": m.payload().len(),
                                })
                                .to_string()
                            } else {
                                format!(
                                    "from {} [{}] channel {} #{}: {}",
                                    m.peer().display_name(),
                                    m.peer().fingerprint,
                                    m.channel(),
                                    m.seq(),
                                    printable(m.payload())
                                )
                            };
                            if tx.send(line).await.is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(Error::Closed) => return Ok(()),
                Err(e) if tls.json => {
                    writeln!(out, "{}", json!({"event": "refused", "error": crate::sentence(&e)}))?;
                    out.flush()?;
                }
                Err(e) => eprintln!("refused a connection: {}", crate::sentence(&e)),
            },
            Some(line) = rx.recv() => {
                writeln!(out, "{line}")?;
                out.flush()?;
                printed += 1;
                if args.count.is_some_and(|c| printed >= c) {
                    // Give the last acknowledgement time to leave before closing.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    node.close();
                    node.wait_idle().await;
                    return Ok(());
                }
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A peer's payload as text safe to print on a terminal: invalid UTF-8 replaced, control
/// characters (escape sequences, carriage returns, bells...) written as `\u{1b}`-style escapes,
/// so a peer cannot rewrite the operator's screen or forge log lines.
fn printable(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload)
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() { c.escape_unicode().collect() } else { vec![c] };
            escaped
        })
        .collect()
}

/// `send`'s exit code for an error (see its `--help`).
fn send_exit_code(e: &Error, sent: bool) -> u8 {
    match e {
        Error::Tls(_) | Error::AlpnMismatch { .. } => 2,
        Error::Unauthorized { .. } => 3,
        Error::Timeout { .. } | Error::ConnectionLost { .. } | Error::Refused if sent => 5,
        Error::Timeout { .. } | Error::ConnectionLost { .. } | Error::Refused => 4,
        _ => 1,
    }
}

/// Reads the message: the argument, or standard input for `-` (at most the largest message a
/// node sends by default).
fn message(arg: String) -> crate::Result<Vec<u8>> {
    if arg != "-" {
        return Ok(arg.into_bytes());
    }
    let limit = Limits::default().max_message_size;
    let mut bytes = Vec::new();
    std::io::stdin().take(limit as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > limit {
        return Err(crate::CliError::Input(format!("the message on standard input is over {limit} bytes")));
    }
    Ok(bytes)
}

pub(crate) async fn send(args: SendArgs, out: &mut impl Write) -> crate::Result<u8> {
    let tls = &args.tls;
    if let Err(e) = quicseal::PeerName::parse(&args.name) {
        return Err(crate::CliError::Input(format!("--name: {}", crate::cert::input_reason(e))));
    }
    let payload = message(args.message)?;
    let mut limits = Limits::default();
    limits.handshake_timeout = args.timeout;
    let (config, _) = tls.config(CliRole::Sender, limits).await?;
    let bind: SocketAddr = if args.to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("literal");
    let node = Node::bind(bind, config)?;
    let (to, name, channel) = (args.to, args.name.as_str(), args.channel);
    let mut sent = false;
    let result: quicseal::Result<(u64, String)> = async {
        // The message leaves right behind our HELLO when it fits in 1 KiB (one round trip
        // sooner); `sent` once the listener accepted the session.
        let (session, seq) = node.connect_and_send_bytes(to, name, channel, payload).await?;
        sent = true;
        tokio::time::timeout(args.timeout, session.delivered(channel))
            .await
            .map_err(|_| Error::Timeout { what: quicseal::Timed::Receipt })??;
        let peer = session.peer().to_string();
        session.close();
        Ok((seq, peer))
    }
    .await;
    node.wait_idle().await;
    match result {
        Ok((seq, peer)) => {
            if tls.json {
                let v = json!({"delivered": true, "to": to.to_string(), "peer": peer, "channel": channel, "seq": seq});
                writeln!(out, "{v}")?;
            } else {
                writeln!(out, "delivered message #{seq} on channel {channel} to {peer}")?;
            }
            Ok(0)
        }
        Err(e) => {
            let code = send_exit_code(&e, sent);
            if code == 1 {
                return Err(e.into());
            }
            let what = if sent { "sent, but not acknowledged" } else { "no session" };
            let message = format!("{to} ({name}): {what}: {}", crate::sentence(&e));
            if tls.json {
                writeln!(
                    out,
                    "{}",
                    json!({"delivered": false, "to": to.to_string(), "exit_code": code, "error": message})
                )?;
            }
            eprintln!("error: {message}");
            Ok(code)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn peer_payloads_are_printed_without_control_characters() {
        let shown = super::printable(b"hi\x1b[2J\r\nforged line\x07 \xff caf\xc3\xa9");
        assert_eq!(shown, "hi\\u{1b}[2J\\u{d}\\u{a}forged line\\u{7} \u{fffd} caf\u{e9}");
        assert!(!shown.chars().any(char::is_control));
    }
}
