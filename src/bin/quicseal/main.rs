//! The `quicseal` command: the PKI (`cert`), durable stores (`store inspect`), smoke tools (`listen`, `send`, `proxy`), the
//! `demo`, and shell completions and a man page generated from the same definition.
//!
//! Exit codes: 0 success; 1 bad input (arguments, files) or another failure; `cert verify` and
//! `send` document their own codes from 2 up. Errors are one line on stderr, as sentences; no
//! `Debug` dump reaches the user. Warnings go to stderr by default, without colour unless stderr
//! is a terminal.

mod args;
mod cert;
mod demo;
mod proxy;
mod scrape;
mod smoke;
mod store;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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
    /// Inspect a node's durable store (streams, outbox, inbox).
    Store(store::StoreArgs),
    /// Run a self-contained demonstration on loopback (throwaway CA, two nodes, refusals).
    Demo,
    /// Accept sessions and print every message with the sender's identity.
    Listen(smoke::ListenArgs),
    /// Send one message and exit 0 only once the listener confirmed receipt.
    Send(smoke::SendArgs),
    /// Forward UDP between two loopback addresses with loss, duplication, reordering,
    /// corruption and blackouts (the netsim link).
    Proxy(proxy::ProxyArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout: `quicseal man > quicseal.1`.
    Man,
}

/// What a command fails with: bad input to the command itself, or the library's error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// Bad input to the command (an argument, a file it was given), as one sentence that says
    /// what and how to fix it.
    #[error("{0}")]
    Input(String),
    /// The library's error.
    #[error("{}", sentence(.0))]
    Lib(#[from] quicseal::Error),
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> CliError {
        CliError::Lib(e.into())
    }
}

/// The result of a command.
pub(crate) type Result<T, E = CliError> = std::result::Result<T, E>;

/// A library error as one sentence: a configuration or input problem is its own message, the
/// rest their `Display`.
pub(crate) fn sentence(e: &quicseal::Error) -> String {
    match e {
        quicseal::Error::Config(m) | quicseal::Error::InvalidInput(m) => m.clone(),
        e => e.to_string(),
    }
}

fn main() -> ExitCode {
    // By default: errors, and the warnings an operator must see (certificates or CAs about to
    // expire, certificate files that changed but cannot be used). RUST_LOG takes
    // `LEVEL` or `TARGET=LEVEL,...` (e.g. `info`, `quicseal=debug`).
    let default = || Targets::new().with_default(Level::ERROR).with_target("quicseal::reload", Level::WARN);
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) => v.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!(
                "warning: RUST_LOG={v:?} ignored ({e}): give LEVEL or TARGET=LEVEL,... (e.g. info, quicseal=debug)"
            );
            default()
        }),
        Err(_) => default(),
    };
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()))
        .with(filter)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version are not errors; every bad argument exits 1 (2 and up are the
            // verdicts of `cert verify` and `send`). A bad value is one line: what and why.
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::ValueValidation | ErrorKind::InvalidValue) {
                eprintln!("{}", e.to_string().lines().next().unwrap_or("error: invalid value"));
                return ExitCode::FAILURE;
            }
            let _ = e.print();
            return if e.use_stderr() { ExitCode::FAILURE } else { ExitCode::SUCCESS };
        }
    };
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let command = match cli.command {
        Command::Cert(args) => return finish(cert::run(args, &mut out, &mut err), &mut out),
        Command::Store(args) => return finish(store::run(args, &mut out), &mut out),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "quicseal", &mut out);
            return ExitCode::SUCCESS;
        }
        Command::Man => {
            let result = clap_mangen::Man::new(Cli::command()).render(&mut out).map_err(CliError::from);
            return finish(result.map(|()| 0), &mut out);
        }
        command => command,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Demo => demo::run(&mut out).await.map(|()| 0),
            Command::Listen(args) => smoke::listen(args, &mut out).await.map(|()| 0),
            Command::Send(args) => smoke::send(args, &mut out).await,
            Command::Proxy(args) => proxy::run(args, &mut out).await.map(|()| 0),
            Command::Cert(_) | Command::Store(_) | Command::Completions { .. } | Command::Man => {
                unreachable!("handled above")
            }
        }
    });
    finish(result, &mut out)
}

fn finish(result: Result<u8>, out: &mut impl Write) -> ExitCode {
    let _ = out.flush();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
