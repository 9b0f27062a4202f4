//! The `quicseal` command: the PKI (`cert`), smoke tools (`listen`, `send`, `proxy`) and the
//! `demo`.

mod cert;
mod demo;
mod proxy;
mod smoke;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "quicseal", version, about = "Secure, authenticated messaging over QUIC")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create and manage certificates: CA, node certificates, revocation, CRLs, inspection.
    Cert(cert::CertArgs),
    /// Run a self-contained demonstration on loopback (throwaway CA, two nodes, refusals).
    Demo,
    /// Accept sessions and print every message with the sender's identity.
    Listen(smoke::ListenArgs),
    /// Send one message and exit 0 only once the listener confirmed receipt.
    Send(smoke::SendArgs),
    /// Forward UDP between two loopback addresses with loss, duplication, reordering,
    /// corruption and blackouts (the netsim link).
    Proxy(proxy::ProxyArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let cli = match cli.command {
        Command::Cert(args) => {
            let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
            return match cert::run(args, &mut out, &mut err) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    let _ = out.flush();
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        command => Cli { command },
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout();
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo => demo::run(&mut out).await,
            Command::Listen(args) => smoke::listen(args, &mut out).await,
            Command::Send(args) => smoke::send(args, &mut out).await,
            Command::Proxy(args) => proxy::run(args, &mut out).await,
            Command::Cert(_) => unreachable!("handled above"),
        }
    });
    let _ = out.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
