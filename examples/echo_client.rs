//! Sends a message to the echo server and prints the echo, using the certificates under
//! `certs/`. See `echo_server.rs`.

use std::path::Path;

use quicseal::{Identity, Node, NodeConfig, TrustStore};

#[tokio::main]
async fn main() -> quicseal::Result<()> {
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
    let identity = Identity::from_pem_files(certs.join("client.crt"), certs.join("client.key"))?;
    let trust = TrustStore::from_ca_file(certs.join("ca.crt"))?;
    let text = std::env::args().nth(1).unwrap_or_else(|| "hello".into());
    let node = Node::bind("127.0.0.1:0".parse().expect("literal"), NodeConfig::new(identity, trust))?;
    let session = node.connect("127.0.0.1:4433".parse().expect("literal"), "server").await?;
    session.send_bytes(0, text.into_bytes()).await?;
    let echo = session.recv().await?;
    println!("echo from {}: {}", echo.peer(), String::from_utf8_lossy(echo.payload()));
    session.close();
    node.wait_idle().await;
    Ok(())
}
