//! `quicseal cert init`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use quicseal::pki::{Ca, CaDir};

use super::{DAY, KeyArg, directory};
use crate::args;

#[derive(Args, Debug)]
pub(super) struct InitArgs {
    /// The CA's name (subject common name).
    #[arg(long)]
    name: String,
    /// Key algorithm.
    #[arg(long, value_enum, default_value = "ecdsa-p256")]
    key_type: KeyArg,
    /// Validity in days (1 to 36500).
    #[arg(long, default_value = "3650", value_parser = args::days)]
    days: u32,
    /// The CA directory to create (`--ca-dir` works too, as in the other commands).
    #[arg(long, visible_alias = "ca-dir", default_value = "certs")]
    out: PathBuf,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

pub(super) fn init(a: InitArgs, out: &mut impl Write) -> crate::Result<u8> {
    if a.name.trim().is_empty() {
        return Err(crate::CliError::Input(
            "--name is empty: give the CA a name, e.g. --name \"db cluster CA\"".into(),
        ));
    }
    directory(&a.out, "--out")?;
    let ca = Ca::new(&a.name, a.key_type.into(), DAY * a.days)?;
    let dir = CaDir::create(&a.out, ca, a.force)?;
    let (crt, key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
    writeln!(
        out,
        "CA {:?} valid for {} days: {} and {} (keep the key offline)",
        a.name,
        a.days,
        crt.display(),
        key.display()
    )?;
    Ok(0)
}
