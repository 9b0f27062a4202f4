//! Creates the certificates the examples use, under `certs/examples/` (or the directory in
//! `QUICSEAL_EXAMPLE_CERTS`): `ca.crt`, `ca.key`, `server.crt`, `server.key`, `client.crt`,
//! `client.key`. Apart from `certs/`, where `quicseal cert` keeps its PKI by default.
//!
//! ```text
//! cargo run --example gen_certs            # refuses to overwrite existing files
//! cargo run --example gen_certs -- --force # replaces them
//! ```

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode;
use std::time::Duration;

use quicseal::pki::{Ca, KeyType, NodeCert};

mod support;

fn main() -> ExitCode {
    support::exit(run())
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let force = std::env::args().any(|a| a == "--force");
    let dir = support::certs_dir();
    std::fs::create_dir_all(&dir)?;
    let ca = Ca::new("quicseal example CA", KeyType::EcdsaP256, Duration::from_secs(365 * 24 * 3600))?;
    let mut files = vec![("ca.crt".to_string(), ca.cert_pem().to_owned()), ("ca.key".into(), ca.key_pem().to_owned())];
    for name in ["server", "client"] {
        let cert = NodeCert::new(name)
            .dns(name)
            .dns("localhost")
            .ip(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .ip(IpAddr::V6(Ipv6Addr::LOCALHOST));
        let issued = ca.issue(&cert)?;
        files.push((format!("{name}.crt"), issued.chain_pem));
        files.push((format!("{name}.key"), issued.key_pem));
    }
    for (name, contents) in files {
        let path = dir.join(&name);
        if force {
            let _ = std::fs::remove_file(&path);
        }
        let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| format!("{}: {e} (use --force to replace)", path.display()))?;
        f.write_all(contents.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
