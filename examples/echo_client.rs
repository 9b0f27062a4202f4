//! Sends a message to the echo server and prints the echo: the README's library example. See
//! `echo_server.rs`.
//!
//! ```text
//! cargo run --example echo_client -- "hello"                  # to 127.0.0.1:4433
//! cargo run --example echo_client -- "hello" 127.0.0.1:5000   # elsewhere
//! ```
//!
//! Certificates come from `certs/examples/` (`cargo run --example gen_certs`), or from the
//! directory in `QUICSEAL_EXAMPLE_CERTS`.

use std::process::ExitCode;

use quicseal::{Identity, Node, NodeConfig, Policy, TrustStore};

mod support;

#[tokio::main]
async fn main() -> ExitCode {
    support::exit(run().await)
}

async fn run() -> quicseal::Result<()> {
    let certs = support::certs_dir();
    let text = std::env::args().nth(1).unwrap_or_else(|| "hello".into());
    let addr = std::env::args().nth(2).unwrap_or_else(|| "127.0.0.1:4433".into());
    let addr = addr.parse().map_err(|e| quicseal::Error::Config(format!("bad address {addr:?}: {e}")))?;

    let identity = Identity::from_pem_files(certs.join("client.crt"), certs.join("client.key"))?;
    let trust = TrustStore::from_ca_file(certs.join("ca.crt"))?;
    let config = NodeConfig::new(identity, trust).policy(Policy::allow_list().allow_name("server"));
    let node = Node::bind("127.0.0.1:0".parse().expect("literal"), config)?;

    let session = node.connect(addr, "server").await?;
    println!("talking to {}", session.peer());
    session.send(0, &text).await?;
    session.delivered(0).await?;
    let echo = session.recv().await?;
    println!("{} says {:?}", echo.peer(), echo.decode::<String>()?);
    session.send_datagram(1, &b"may be lost"[..]).await?;
    println!("{}", session.stats());
    session.close();
    node.wait_idle().await;
    Ok(())
}
