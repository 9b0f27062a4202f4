//! Echoes every message back to its sender.
//!
//! ```text
//! cargo run --example gen_certs      # once
//! cargo run --example echo_server    # listens on 127.0.0.1:4433 (or the address given)
//! cargo run --example echo_client -- "hello"
//! ```
//!
//! Certificates come from `certs/examples/` (`cargo run --example gen_certs`), or from the
//! directory in `QUICSEAL_EXAMPLE_CERTS`.

use std::process::ExitCode;

use quicseal::{Identity, Node, NodeConfig, TrustStore};

mod support;

#[tokio::main]
async fn main() -> ExitCode {
    support::exit(run().await)
}

async fn run() -> quicseal::Result<()> {
    let certs = support::certs_dir();
    let identity = Identity::from_pem_files(certs.join("server.crt"), certs.join("server.key"))?;
    let trust = TrustStore::from_ca_file(certs.join("ca.crt"))?;
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:4433".into());
    let addr = addr.parse().map_err(|e| quicseal::Error::Config(format!("bad address {addr:?}: {e}")))?;
    let node = Node::bind(addr, NodeConfig::new(identity, trust))?;
    println!("echo server on {}", node.local_addr()?);
    loop {
        match node.accept().await {
            Ok(session) => {
                tokio::spawn(async move {
                    println!("session with {}", session.peer());
                    while let Ok(m) = session.recv().await {
                        if session.send_bytes(m.channel(), m.payload().clone()).await.is_err() {
                            break;
                        }
                    }
                });
            }
            Err(quicseal::Error::Closed) => return Ok(()),
            Err(e) => eprintln!("refused: {e}"),
        }
    }
}
