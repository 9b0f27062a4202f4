//! `quicseal listen` and `quicseal send`: how an operator checks that certificates (made by
//! any standard tool) and connectivity work.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use quicseal::{Identity, Limits, Node, NodeConfig, Policy, TrustStore};

/// Options shared by `listen` and `send`.
#[derive(clap::Args, Debug)]
pub(crate) struct Tls {
    /// This node's certificate chain (PEM, leaf first).
    #[arg(long)]
    cert: PathBuf,
    /// This node's private key (PEM: PKCS#8, SEC1 or PKCS#1).
    #[arg(long)]
    key: PathBuf,
    /// CA certificate(s) to trust (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// Certificate revocation list(s) (PEM), repeatable.
    #[arg(long)]
    crl: Vec<PathBuf>,
    /// Only allow peers with this DNS/IP/URI SAN or CN (repeatable; default: any peer from the CA).
    #[arg(long)]
    allow: Vec<String>,
}

impl Tls {
    fn config(&self, timeout: Option<Duration>) -> quicseal::Result<NodeConfig> {
        let identity = Identity::from_pem_files(&self.cert, &self.key)?;
        let mut trust = TrustStore::from_ca_file(&self.ca)?;
        for crl in &self.crl {
            trust.add_crl_file(crl)?;
        }
        let policy = if self.allow.is_empty() {
            Policy::any_authenticated()
        } else {
            self.allow.iter().fold(Policy::allow_list(), |p, name| p.allow_name(name))
        };
        let mut limits = Limits::default();
        if let Some(t) = timeout {
            limits.handshake_timeout = t;
        }
        Ok(NodeConfig::new(identity, trust).policy(policy).limits(limits))
    }
}

/// `quicseal listen`.
#[derive(clap::Args, Debug)]
pub(crate) struct ListenArgs {
    #[command(flatten)]
    tls: Tls,
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:4433")]
    bind: SocketAddr,
    /// Exit after printing this many messages (default: run until killed).
    #[arg(long)]
    count: Option<u64>,
}

/// `quicseal send`.
#[derive(clap::Args, Debug)]
pub(crate) struct SendArgs {
    #[command(flatten)]
    tls: Tls,
    /// The listener's UDP address.
    #[arg(long)]
    to: SocketAddr,
    /// The name the listener's certificate must carry (DNS or IP SAN).
    #[arg(long)]
    name: String,
    /// Channel to send on.
    #[arg(long, default_value_t = 0)]
    channel: u16,
    /// Give up after this many seconds (handshake, then the receipt).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// The message (sent as UTF-8 bytes).
    message: String,
}

pub(crate) async fn listen(args: ListenArgs, out: &mut impl Write) -> quicseal::Result<()> {
    let node = Node::bind(args.bind, args.tls.config(None)?)?;
    writeln!(out, "listening on {}", node.local_addr()?)?;
    out.flush()?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(64);
    let mut printed = 0u64;
    loop {
        tokio::select! {
            accepted = node.accept() => match accepted {
                Ok(session) => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        while let Ok(m) = session.recv().await {
                            let line = format!(
                                "from {} [{}] channel {} #{}: {}",
                                m.peer().display_name(),
                                m.peer().fingerprint,
                                m.channel(),
                                m.seq(),
                                printable(m.payload())
                            );
                            if tx.send(line).await.is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(quicseal::Error::Closed) => return Ok(()),
                Err(e) => eprintln!("refused a connection: {e}"),
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

pub(crate) async fn send(args: SendArgs, out: &mut impl Write) -> quicseal::Result<()> {
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(quicseal::Error::Config("--timeout must be a positive number of seconds".into()));
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    let bind: SocketAddr = if args.to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("literal");
    let node = Node::bind(bind, args.tls.config(Some(timeout))?)?;
    let session = node.connect(args.to, &args.name).await?;
    let seq = session.send_bytes(args.channel, args.message.into_bytes()).await?;
    tokio::time::timeout(timeout, session.delivered(args.channel))
        .await
        .map_err(|_| quicseal::Error::Timeout { what: "delivery receipt" })??;
    writeln!(out, "delivered message #{seq} on channel {} to {}", args.channel, session.peer())?;
    session.close();
    node.wait_idle().await;
    Ok(())
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
