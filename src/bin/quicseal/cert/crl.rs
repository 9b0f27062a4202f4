//! `quicseal cert crl`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use quicseal::pki::CaDir;

use crate::args;

#[derive(Args, Debug)]
pub(super) struct CrlArgs {
    /// Days until the CRL's next update (nodes refuse every certificate of the CA after it);
    /// 1 to 36500.
    #[arg(long, default_value = "7", value_parser = args::days)]
    days: u32,
    /// Directory of the CA.
    #[arg(long, default_value = "certs")]
    ca_dir: PathBuf,
}

pub(super) fn crl(a: CrlArgs, out: &mut impl Write) -> crate::Result<u8> {
    let (path, revoked) = CaDir::open(&a.ca_dir)?.write_crl(a.days)?;
    writeln!(out, "{}: {revoked} revoked, next update in {} days", path.display(), a.days)?;
    Ok(0)
}
