//! `quicseal cert issue`.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Args;
use quicseal::pki::{CaDir, NodeCert, Usage, hex, refuse_existing, write_atomic};

use super::{KeyArg, directory};
use crate::args;

#[derive(Args, Debug)]
pub(super) struct IssueArgs {
    /// The node's name: subject common name, file name, and a DNS SAN (see --no-default-san).
    node: String,
    /// Additional DNS name SAN (repeatable).
    #[arg(long)]
    dns: Vec<String>,
    /// IP address SAN (repeatable).
    #[arg(long)]
    ip: Vec<IpAddr>,
    /// URI SAN, e.g. spiffe://example.org/node/a (repeatable).
    #[arg(long)]
    uri: Vec<String>,
    /// Make an X.509-SVID for this SPIFFE ID: the ID is the certificate's one URI SAN, and NODE
    /// is not added as a DNS SAN (--dns and --ip may still add names).
    #[arg(long, value_name = "SPIFFE_ID", conflicts_with = "uri")]
    spiffe_id: Option<String>,
    /// Validity in days (1 to 36500, and not beyond the CA's own expiry).
    #[arg(long, default_value = "90", value_parser = args::days)]
    days: u32,
    /// Only clientAuth (the node dials but does not accept).
    #[arg(long, conflicts_with = "server_only")]
    client_only: bool,
    /// Only serverAuth (the node accepts but does not dial).
    #[arg(long)]
    server_only: bool,
    /// Do not add NODE as a DNS SAN.
    #[arg(long)]
    no_default_san: bool,
    /// Key algorithm.
    #[arg(long, value_enum, default_value = "ecdsa-p256")]
    key_type: KeyArg,
    /// Directory of ca.crt and ca.key.
    #[arg(long, default_value = "certs")]
    ca_dir: PathBuf,
    /// Output directory (default: the CA directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

pub(super) fn issue(a: IssueArgs, out: &mut impl Write) -> crate::Result<u8> {
    // NODE names the files too: keep it a plain file name.
    let plain = a.node.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if a.node.is_empty() || a.node.starts_with('.') || !plain {
        return Err(crate::CliError::Input(format!(
            "node name {:?}: use letters, digits, '-', '_' and '.' (it names the files too)",
            a.node
        )));
    }
    let ca_dir = CaDir::open(&a.ca_dir)?;
    let ca = ca_dir.ca();
    let dir = a.out.clone().unwrap_or(a.ca_dir.clone());
    directory(&dir, "--out")?;
    let not_after = ca_dir.leaf_not_after(a.days)?;
    let now = SystemTime::now();
    let mut node =
        NodeCert::new(&a.node).validity(now - Duration::from_secs(60), not_after).key_type(a.key_type.into());
    if !a.no_default_san && a.spiffe_id.is_none() {
        node = node.dns(&a.node);
    }
    if let Some(id) = &a.spiffe_id {
        let id = quicseal::SpiffeId::parse(id)
            .map_err(|e| crate::CliError::Input(format!("--spiffe-id: {}", super::input_reason(e))))?;
        node = node.uri(id.as_str());
    }
    for d in &a.dns {
        node = node.dns(d);
    }
    for ip in &a.ip {
        node = node.ip(*ip);
    }
    for u in &a.uri {
        node = node.uri(u);
    }
    node = node.usage(match (a.client_only, a.server_only) {
        (true, _) => Usage::ClientOnly,
        (_, true) => Usage::ServerOnly,
        _ => Usage::ClientAndServer,
    });
    let issued = ca.issue(&node)?;
    let (crt, key) = (dir.join(format!("{}.crt", a.node)), dir.join(format!("{}.key", a.node)));
    refuse_existing(&[&crt, &key], a.force)?;
    // Recorded first: a serial in the list whose files failed to write is harmless, a
    // certificate on disk that `revoke --serial` does not know is not.
    ca_dir.record_issued(&issued.serial, &a.node, not_after)?;
    write_atomic(&key, &issued.key_pem, 0o600, a.force)?;
    write_atomic(&crt, &issued.chain_pem, 0o644, a.force)?;
    writeln!(
        out,
        "issued {} (serial {}), valid {} days: {} and {}",
        a.node,
        hex(&issued.serial),
        a.days,
        crt.display(),
        key.display()
    )?;
    Ok(0)
}
