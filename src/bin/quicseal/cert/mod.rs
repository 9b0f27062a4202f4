//! `quicseal cert`: bootstrap and run a quicseal PKI (CA, node certificates, revocation, CRLs,
//! inspection, verification, renewal).
//!
//! Each subcommand is a function of its arguments and two writers, so it is tested in-process.
//! Files are written to a temporary file in the target directory and renamed into place, so a
//! failure never leaves a partial file; private keys are created with mode 0600 in the same
//! step. Keys and certificates are never overwritten without `--force`; `crl` and `renew`
//! replace their outputs by design (atomically).
//!
//! The CA directory's format is the library's [`quicseal::pki::CaDir`]; each subcommand is
//! one file here.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use quicseal::pki::KeyType;

mod crl;
mod init;
mod inspect;
mod issue;
mod renew;
mod revoke;
mod verify;

pub(crate) use verify::input_reason;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// `quicseal cert` arguments.
#[derive(Args, Debug)]
pub(crate) struct CertArgs {
    #[command(subcommand)]
    command: CertCommand,
}

#[derive(Subcommand, Debug)]
enum CertCommand {
    /// Create a CA: writes DIR/ca.crt and DIR/ca.key (mode 0600).
    Init(init::InitArgs),
    /// Issue a node certificate: writes DIR/NODE.crt (leaf, then CA) and DIR/NODE.key (0600).
    Issue(issue::IssueArgs),
    /// Record a certificate's revocation next to the CA (then run `crl`).
    Revoke(revoke::RevokeArgs),
    /// Write DIR/ca.crl, signed by the CA, listing every revoked certificate.
    Crl(crl::CrlArgs),
    /// Show a certificate, a chain or a CRL.
    Inspect(inspect::InspectArgs),
    /// Validate a certificate exactly as a quicseal node does. Exit codes: 0 valid, 2 not
    /// trusted (unknown CA, bad signature, wrong usage, a CA certificate), 3 expired or not yet
    /// valid, 4 revoked, 5 wrong name, 1 bad input (unreadable or malformed files, an invalid
    /// --name) and other errors.
    Verify(verify::VerifyArgs),
    /// Reissue a certificate with the same names and a new key (or the same key), in place.
    Renew(renew::RenewArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(super) enum KeyArg {
    #[value(name = "ecdsa-p256")]
    EcdsaP256,
    #[value(name = "ed25519")]
    Ed25519,
}

impl From<KeyArg> for KeyType {
    fn from(k: KeyArg) -> KeyType {
        match k {
            KeyArg::EcdsaP256 => KeyType::EcdsaP256,
            KeyArg::Ed25519 => KeyType::Ed25519,
        }
    }
}

/// Runs a `cert` subcommand; returns the process exit code.
pub(crate) fn run(args: CertArgs, out: &mut impl Write, err: &mut impl Write) -> crate::Result<u8> {
    match args.command {
        CertCommand::Init(a) => init::init(a, out),
        CertCommand::Issue(a) => issue::issue(a, out),
        CertCommand::Revoke(a) => revoke::revoke(a, out),
        CertCommand::Crl(a) => crl::crl(a, out),
        CertCommand::Inspect(a) => inspect::inspect(a, out, err),
        CertCommand::Verify(a) => verify::verify(a, out),
        CertCommand::Renew(a) => renew::renew(a, out),
    }
}

/// Refuses an output directory that exists as something else (a file).
pub(super) fn directory(dir: &Path, flag: &str) -> crate::Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(crate::CliError::Input(format!(
            "{flag} {}: not a directory: give a directory to write into",
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
