//! What the examples share: where their certificates are, and how they end.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `certs/examples/` in this checkout (where `gen_certs` writes), or the directory in
/// `QUICSEAL_EXAMPLE_CERTS`.
pub(crate) fn certs_dir() -> PathBuf {
    std::env::var_os("QUICSEAL_EXAMPLE_CERTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/examples"))
}

/// An example's exit code: 0, or 1 with the error printed as a sentence (not a `Debug` dump).
pub(crate) fn exit<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
