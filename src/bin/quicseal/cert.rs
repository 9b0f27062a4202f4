//! `quicseal cert`: bootstrap and run a quicseal PKI (CA, node certificates, revocation, CRLs,
//! inspection, verification, renewal).
//!
//! Each subcommand is a function of its arguments and two writers, so it is tested in-process.
//! Files are written to a temporary file in the target directory and renamed into place, so a
//! failure never leaves a partial file; private keys are created with mode 0600 in the same
//! step. Keys and certificates are never overwritten without `--force`; `crl` and `renew`
//! replace their outputs by design (atomically).
//!
//! A CA directory holds `ca.crt`, `ca.key`, `revoked` (one line per revoked certificate:
//! serial in hex, Unix time of revocation, reason, and the key's fingerprint when it was revoked
//! from the certificate file) and `ca.crl`.

use std::fmt::Write as _;
use std::fs::Permissions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use quicseal::pki::{Ca, KeyType, NodeCert, Revoked, Usage};
use quicseal::rustls::CertificateError;
use quicseal::{Error, TlsError, TrustStore};
use serde_json::json;
use x509_parser::prelude::*;

use crate::args;

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
    Init(InitArgs),
    /// Issue a node certificate: writes DIR/NODE.crt (leaf, then CA) and DIR/NODE.key (0600).
    Issue(IssueArgs),
    /// Record a certificate's revocation next to the CA (then run `crl`).
    Revoke(RevokeArgs),
    /// Write DIR/ca.crl, signed by the CA, listing every revoked certificate.
    Crl(CrlArgs),
    /// Show a certificate, a chain or a CRL.
    Inspect(InspectArgs),
    /// Validate a certificate exactly as a quicseal node does. Exit codes: 0 valid, 2 not
    /// trusted (unknown CA, bad signature, wrong usage, a CA certificate), 3 expired or not yet
    /// valid, 4 revoked, 5 wrong name, 1 bad input (unreadable or malformed files, an invalid
    /// --name) and other errors.
    Verify(VerifyArgs),
    /// Reissue a certificate with the same names and a new key (or the same key), in place.
    Renew(RenewArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum KeyArg {
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

#[derive(Args, Debug)]
struct InitArgs {
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

#[derive(Args, Debug)]
struct IssueArgs {
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

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ReasonArg {
    Unspecified,
    KeyCompromise,
    Superseded,
    CessationOfOperation,
    AffiliationChanged,
}

impl ReasonArg {
    fn rcgen(self) -> rcgen::RevocationReason {
        use rcgen::RevocationReason as R;
        match self {
            ReasonArg::Unspecified => R::Unspecified,
            ReasonArg::KeyCompromise => R::KeyCompromise,
            ReasonArg::Superseded => R::Superseded,
            ReasonArg::CessationOfOperation => R::CessationOfOperation,
            ReasonArg::AffiliationChanged => R::AffiliationChanged,
        }
    }
}

#[derive(Args, Debug)]
struct RevokeArgs {
    /// The certificate to revoke (or give --serial).
    #[arg(required_unless_present = "serial", conflicts_with = "serial")]
    cert: Option<PathBuf>,
    /// The serial number to revoke, in hex; it must be one `cert issue` or `cert renew`
    /// recorded in the CA directory's `issued` list, unless --force.
    #[arg(long)]
    serial: Option<String>,
    /// Why.
    #[arg(long, value_enum, default_value = "unspecified")]
    reason: ReasonArg,
    /// Directory of the CA.
    #[arg(long, default_value = "certs")]
    ca_dir: PathBuf,
    /// Revoke a --serial this CA directory has no record of issuing.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct CrlArgs {
    /// Days until the CRL's next update (nodes refuse every certificate of the CA after it);
    /// 1 to 36500.
    #[arg(long, default_value = "7", value_parser = args::days)]
    days: u32,
    /// Directory of the CA.
    #[arg(long, default_value = "certs")]
    ca_dir: PathBuf,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// A PEM certificate, chain or CRL.
    file: PathBuf,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// The certificate (or chain, leaf first) to validate.
    cert: PathBuf,
    /// The CA certificate(s).
    #[arg(long, default_value = "certs/ca.crt")]
    ca: PathBuf,
    /// A CRL to check against (repeatable).
    #[arg(long)]
    crl: Vec<PathBuf>,
    /// Check as a node dialling NAME does (NAME must be a SAN; serverAuth). Without it, check
    /// as a node accepting the certificate's owner does (clientAuth).
    #[arg(long)]
    name: Option<String>,
    /// JSON output: one object with the verdict, the exit code and the reason.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RenewArgs {
    /// The certificate to renew; replaced in place.
    cert: PathBuf,
    /// Its key (default: the certificate's path with .key); replaced unless --reuse-key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Keep the current key.
    #[arg(long)]
    reuse_key: bool,
    /// Validity in days (1 to 36500, and not beyond the CA's own expiry).
    #[arg(long, default_value = "90", value_parser = args::days)]
    days: u32,
    /// Directory of the CA.
    #[arg(long, default_value = "certs")]
    ca_dir: PathBuf,
}

/// Runs a `cert` subcommand; returns the process exit code.
pub(crate) fn run(args: CertArgs, out: &mut impl Write, err: &mut impl Write) -> quicseal::Result<u8> {
    match args.command {
        CertCommand::Init(a) => init(a, out),
        CertCommand::Issue(a) => issue(a, out),
        CertCommand::Revoke(a) => revoke(a, out),
        CertCommand::Crl(a) => crl(a, out),
        CertCommand::Inspect(a) => inspect(a, out, err),
        CertCommand::Verify(a) => verify(a, out),
        CertCommand::Renew(a) => renew(a, out),
    }
}

fn init(a: InitArgs, out: &mut impl Write) -> quicseal::Result<u8> {
    if a.name.trim().is_empty() {
        return Err(Error::Config("--name is empty: give the CA a name, e.g. --name \"db cluster CA\"".into()));
    }
    directory(&a.out, "--out")?;
    let ca = Ca::new(&a.name, a.key_type.into(), DAY * a.days)?;
    let (crt, key) = (a.out.join("ca.crt"), a.out.join("ca.key"));
    refuse_existing(&[&crt, &key], a.force)?;
    write_atomic(&key, ca.key_pem(), 0o600, a.force)?;
    write_atomic(&crt, ca.cert_pem(), 0o644, a.force)?;
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

/// Refuses an output directory that exists as something else (a file).
fn directory(dir: &Path, flag: &str) -> quicseal::Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::Config(format!(
            "{flag} {}: not a directory: give a directory to write into",
            dir.display()
        )));
    }
    Ok(())
}

/// When the CA certificate stops being valid: a certificate it issues must not outlive it.
fn ca_not_after(ca: &Ca) -> quicseal::Result<SystemTime> {
    let (_, cert) = X509Certificate::from_der(ca.cert_der())
        .map_err(|e| Error::Config(format!("the CA certificate does not parse: {e}")))?;
    let secs = cert.validity().not_after.timestamp();
    Ok(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

/// The end of validity of a certificate issued now for `days`, refused when it would outlive
/// the CA (nodes would then hold a certificate that fails once the CA expires).
fn leaf_not_after(ca: &Ca, ca_dir: &Path, days: u32) -> quicseal::Result<SystemTime> {
    let now = SystemTime::now();
    let (not_after, ca_end) = (now + DAY * days, ca_not_after(ca)?);
    if not_after > ca_end {
        let left = ca_end.duration_since(now).map(|d| d.as_secs() / 86_400).unwrap_or(0);
        return Err(Error::Config(format!(
            "--days {days}: the certificate would outlive the CA in {} (valid {left} more days): give --days {left} \
             or less, or make a new CA (`cert init --out NEWDIR`)",
            ca_dir.display()
        )));
    }
    Ok(not_after)
}

/// One line of the CA's `issued` file: what `revoke --serial` checks a serial against.
fn record_issued(dir: &Path, serial: &[u8], name: &str, not_after: SystemTime) -> quicseal::Result<()> {
    let path = dir.join("issued");
    let mut text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "# serial not-after-unix-time name (quicseal cert issue and renew)\n".to_owned()
        }
        Err(e) => return Err(Error::Config(format!("{}: cannot read it: {e}", path.display()))),
    };
    let until = not_after.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let _ = writeln!(text, "{} {until} {name}", hex(serial));
    write_atomic(&path, &text, 0o644, true)
}

/// Whether the CA directory's `issued` file lists `serial`.
fn was_issued(dir: &Path, serial: &[u8]) -> quicseal::Result<bool> {
    let path = dir.join("issued");
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(t.lines().filter_map(|l| l.split_whitespace().next()).any(|s| unhex(s).as_deref() == Some(serial))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::Config(format!("{}: cannot read it: {e}", path.display()))),
    }
}

fn load_ca(dir: &Path) -> quicseal::Result<Ca> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path)
            .map_err(|e| Error::Config(format!("{}: cannot read the CA: {e}", path.display())))
    };
    let (cert, key) = (read("ca.crt")?, read("ca.key")?);
    Ca::from_pem(&cert, &key).map_err(|e| Error::Config(format!("{}: {e}", dir.display())))
}

fn issue(a: IssueArgs, out: &mut impl Write) -> quicseal::Result<u8> {
    // NODE names the files too: keep it a plain file name.
    let plain = a.node.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if a.node.is_empty() || a.node.starts_with('.') || !plain {
        return Err(Error::Config(format!(
            "node name {:?}: use letters, digits, '-', '_' and '.' (it names the files too)",
            a.node
        )));
    }
    let ca = load_ca(&a.ca_dir)?;
    let dir = a.out.clone().unwrap_or(a.ca_dir.clone());
    directory(&dir, "--out")?;
    let not_after = leaf_not_after(&ca, &a.ca_dir, a.days)?;
    let now = SystemTime::now();
    let mut node =
        NodeCert::new(&a.node).validity(now - Duration::from_secs(60), not_after).key_type(a.key_type.into());
    if !a.no_default_san {
        node = node.dns(&a.node);
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
    record_issued(&a.ca_dir, &issued.serial, &a.node, not_after)?;
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

/// One line of the CA's `revoked` file.
struct Revocation {
    serial: Vec<u8>,
    at: u64,
    reason: String,
    /// The revoked certificate's key fingerprint, when it was revoked from the certificate (not
    /// by `--serial`): a key revoked for compromise is refused under any certificate.
    key: Option<quicseal::Fingerprint>,
}

fn read_revoked(dir: &Path) -> quicseal::Result<Vec<Revocation>> {
    let path = dir.join("revoked");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Config(format!("{}: {e}", path.display()))),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .enumerate()
        .map(|(i, line)| {
            let bad =
                || Error::Config(format!("{} line {}: expected `SERIAL UNIX-TIME REASON`", path.display(), i + 1));
            let mut f = line.split_whitespace();
            let serial = unhex(f.next().ok_or_else(bad)?).ok_or_else(bad)?;
            let at = f.next().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
            let reason = f.next().unwrap_or("unspecified").to_owned();
            let key = f.next().map(|k| k.parse().map_err(|_| bad())).transpose()?;
            Ok(Revocation { serial, at, reason, key })
        })
        .collect()
}

fn revoke(a: RevokeArgs, out: &mut impl Write) -> quicseal::Result<u8> {
    let ca = load_ca(&a.ca_dir)?;
    let (serial, key) = match (&a.cert, &a.serial) {
        (Some(path), _) => {
            let chain = quicseal::load_certificates(path)?;
            if !ca.is_issuer_of(&chain[0]) {
                return Err(Error::Config(format!(
                    "{} was not issued by the CA in {}",
                    path.display(),
                    a.ca_dir.display()
                )));
            }
            let (_, cert) = X509Certificate::from_der(&chain[0]).map_err(|e| Error::Config(e.to_string()))?;
            let key = quicseal::Fingerprint::of_spki(cert.tbs_certificate.subject_pki.raw);
            (cert.raw_serial().to_vec(), Some(key))
        }
        (None, Some(hex)) => {
            let serial = unhex(hex).ok_or_else(|| Error::Config(format!("not a hex serial number: {hex:?}")))?;
            if !a.force && !was_issued(&a.ca_dir, &serial)? {
                return Err(Error::Config(format!(
                    "serial {hex} was never issued from {} (not in its `issued` list): check the serial \
                     (`cert inspect CERT` shows it), or add --force to revoke it anyway",
                    a.ca_dir.display()
                )));
            }
            (serial, None)
        }
        (None, None) => return Err(Error::Config("give a certificate or --serial".into())),
    };
    let mut list = read_revoked(&a.ca_dir)?;
    if list.iter().any(|r| r.serial == serial) {
        writeln!(out, "serial {} was already revoked", hex(&serial))?;
        return Ok(0);
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let reason = format!("{:?}", a.reason.rcgen());
    list.push(Revocation { serial: serial.clone(), at: now, reason, key });
    let mut text = String::from("# serial unix-time reason [key-fingerprint] (quicseal cert revoke)\n");
    for r in &list {
        let _ = write!(text, "{} {} {}", hex(&r.serial), r.at, r.reason);
        if let Some(key) = &r.key {
            let _ = write!(text, " {key}");
        }
        text.push('\n');
    }
    write_atomic(&a.ca_dir.join("revoked"), &text, 0o644, true)?;
    writeln!(out, "revoked serial {}; run `quicseal cert crl` to publish it", hex(&serial))?;
    Ok(0)
}

fn reason_of(name: &str) -> Option<rcgen::RevocationReason> {
    use rcgen::RevocationReason as R;
    Some(match name {
        "KeyCompromise" => R::KeyCompromise,
        "Superseded" => R::Superseded,
        "CessationOfOperation" => R::CessationOfOperation,
        "AffiliationChanged" => R::AffiliationChanged,
        _ => R::Unspecified,
    })
}

fn crl(a: CrlArgs, out: &mut impl Write) -> quicseal::Result<u8> {
    let ca = load_ca(&a.ca_dir)?;
    let list = read_revoked(&a.ca_dir)?;
    let revoked: Vec<Revoked> = list
        .iter()
        .map(|r| Revoked {
            serial: r.serial.clone(),
            revoked_at: UNIX_EPOCH + Duration::from_secs(r.at),
            reason: reason_of(&r.reason),
        })
        .collect();
    let now = SystemTime::now();
    // The CRL number must grow with every CRL: the issue time in seconds does.
    let number = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let pem = ca.crl(&revoked, number, now - Duration::from_secs(60), now + DAY * a.days)?;
    let path = a.ca_dir.join("ca.crl");
    write_atomic(&path, &pem, 0o644, true)?;
    writeln!(out, "{}: {} revoked, next update in {} days", path.display(), revoked.len(), a.days)?;
    Ok(0)
}

fn inspect(a: InspectArgs, out: &mut impl Write, err: &mut impl Write) -> quicseal::Result<u8> {
    let bytes =
        std::fs::read(&a.file).map_err(|e| Error::Config(format!("{}: cannot read it: {e}", a.file.display())))?;
    let inspection = quicseal::pki::inspect_pem(&bytes)
        .map_err(|e| Error::Config(format!("{}: {}", a.file.display(), crate::sentence(&e))))?;
    for label in &inspection.skipped {
        writeln!(err, "skipping a PEM `{label}` section")?;
    }
    let reports = inspection.reports;
    if a.json {
        let mut reports: Vec<serde_json::Value> = reports
            .into_iter()
            .map(|r| serde_json::Value::Object(r.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
            .collect();
        let v = if reports.len() == 1 { reports.remove(0) } else { serde_json::Value::Array(reports) };
        writeln!(out, "{}", serde_json::to_string_pretty(&v).map_err(|e| Error::Config(e.to_string()))?)?;
        return Ok(0);
    }
    for (i, r) in reports.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        for (k, v) in r {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(items) if items.is_empty() => "-".to_owned(),
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|x| x.as_str().map(str::to_owned).unwrap_or_else(|| x.to_string()))
                    .collect::<Vec<_>>()
                    .join(", "),
                serde_json::Value::Null => "-".to_owned(),
                other => other.to_string(),
            };
            writeln!(out, "{k:<13} {v}")?;
        }
    }
    Ok(0)
}

fn verify(a: VerifyArgs, out: &mut impl Write) -> quicseal::Result<u8> {
    // Bad input is exit 1, not a verdict: a file that is not a certificate, a name that is not
    // one.
    if let Some(name) = &a.name {
        if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
            return Err(Error::Config(format!("--name {name:?}: not a DNS name or IP address")));
        }
    }
    let chain = quicseal::load_certificates(&a.cert)?;
    for (i, der) in chain.iter().enumerate() {
        X509Certificate::from_der(der).map_err(|_| {
            Error::Config(format!(
                "{}: certificate {} of the file is not a valid X.509 certificate (malformed DER)",
                a.cert.display(),
                i + 1
            ))
        })?;
    }
    let mut trust = TrustStore::from_ca_file(&a.ca)?;
    for crl in &a.crl {
        trust.add_crl_file(crl)?;
    }
    let (code, verdict) = match trust.verify(&chain, a.name.as_deref()) {
        Ok(peer) => (0, format!("OK: {} ({})", a.cert.display(), peer.display_name())),
        Err(Error::Tls(tls @ TlsError::Local { .. })) => {
            use quicseal::rustls::Error as R;
            let TlsError::Local { error, .. } = &tls else { unreachable!("matched above") };
            let code = match error {
                R::InvalidCertificate(CertificateError::Expired | CertificateError::NotValidYet)
                | R::InvalidCertificate(CertificateError::ExpiredContext { .. })
                | R::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => 3,
                R::InvalidCertificate(CertificateError::Revoked) => 4,
                R::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                ) => 5,
                _ => 2,
            };
            (code, format!("INVALID: {}: {}", a.cert.display(), tls.reason()))
        }
        Err(e) => return Err(e),
    };
    if a.json {
        let v =
            json!({"file": a.cert.display().to_string(), "valid": code == 0, "exit_code": code, "verdict": verdict});
        writeln!(out, "{v}")?;
    } else {
        writeln!(out, "{verdict}")?;
    }
    Ok(code)
}

fn renew(a: RenewArgs, out: &mut impl Write) -> quicseal::Result<u8> {
    let ca = load_ca(&a.ca_dir)?;
    let chain = quicseal::load_certificates(&a.cert)?;
    if !ca.is_issuer_of(&chain[0]) {
        return Err(Error::Config(format!("{} was not issued by the CA in {}", a.cert.display(), a.ca_dir.display())));
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| Error::Config(format!("{}: certificate does not parse: {e}", a.cert.display())))?;
    if parsed.is_ca() {
        // Renewing a CA as a node certificate would replace the CA's key with a node key and
        // write a node certificate over the CA's: every later issuance would be broken.
        return Err(Error::Config(format!(
            "{} is a CA certificate: `cert renew` renews node certificates. To rotate a CA, make a new one with \
             `cert init --out NEWDIR`, trust both CA certificates during an overlap, re-issue the nodes from the \
             new CA, then drop the old one",
            a.cert.display()
        )));
    }
    let key_path = a.key.clone().unwrap_or_else(|| a.cert.with_extension("key"));
    if key_path.is_dir() {
        return Err(Error::Config(format!(
            "--key {}: is a directory: give the key file (default: the certificate's path with .key)",
            key_path.display()
        )));
    }
    let not_after = leaf_not_after(&ca, &a.ca_dir, a.days)?;
    let mut spec = NodeCert::from_certificate(&chain[0], DAY * a.days)?;
    spec = spec.validity(SystemTime::now() - Duration::from_secs(60), not_after);
    let issued = if a.reuse_key {
        let key =
            std::fs::read_to_string(&key_path).map_err(|e| Error::Config(format!("{}: {e}", key_path.display())))?;
        // The key must be this certificate's own.
        let cert_pem = std::fs::read(&a.cert)?;
        quicseal::Identity::from_pem(&cert_pem, key.as_bytes()).map_err(|e| {
            Error::Config(format!("{} is not the key of {}: {e}", key_path.display(), a.cert.display()))
        })?;
        // A key revoked for compromise is never certified again, under this certificate or any
        // other that carried it.
        let fingerprint = quicseal::Fingerprint::of_spki(parsed.tbs_certificate.subject_pki.raw);
        let compromised = read_revoked(&a.ca_dir)?
            .iter()
            .any(|r| r.reason == "KeyCompromise" && (r.serial == parsed.raw_serial() || r.key == Some(fingerprint)));
        if compromised {
            return Err(Error::Config(format!(
                "the key of {} was revoked for key compromise: it must not be certified again; renew without \
                 --reuse-key",
                a.cert.display()
            )));
        }
        ca.issue_with_key(&spec, &key)?
    } else {
        ca.issue(&spec)?
    };
    let name = parsed.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or("-");
    record_issued(&a.ca_dir, &issued.serial, name, not_after)?;
    if !a.reuse_key {
        write_atomic(&key_path, &issued.key_pem, 0o600, true)?;
    }
    write_atomic(&a.cert, &issued.chain_pem, 0o644, true)?;
    let what = if a.reuse_key { "same key" } else { "new key" };
    writeln!(out, "renewed {} (serial {}, {what}), valid {} days", a.cert.display(), hex(&issued.serial), a.days)?;
    Ok(0)
}

/// Refuses when any of `paths` exists, unless `force`: checked for every output before the
/// first is written, so a refused command writes nothing.
fn refuse_existing(paths: &[&Path], force: bool) -> quicseal::Result<()> {
    if force {
        return Ok(());
    }
    for p in paths {
        if p.exists() {
            return Err(Error::Config(format!("{} exists; use --force to replace it", p.display())));
        }
    }
    Ok(())
}

/// Writes `contents` to a new temporary file in `path`'s directory, created with `mode` (no
/// window where a key is readable by others), then moves it to `path`: with `replace`, by
/// rename over what is there; without, refusing if `path` exists (atomically: no
/// check-then-write race).
fn write_atomic(path: &Path, contents: &str, mode: u32, replace: bool) -> quicseal::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let failed = |what: &str, e: std::io::Error| Error::Config(format!("{}: cannot {what}: {e}", path.display()));
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Config(format!("{}: cannot create the directory: {e}", dir.display())))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".quicseal-")
        .permissions(Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(|e| failed("write a file beside it", e))?;
    tmp.write_all(contents.as_bytes()).map_err(|e| failed("write", e))?;
    tmp.as_file().sync_all().map_err(|e| failed("write", e))?;
    let result = if replace { tmp.persist(path).map(drop) } else { tmp.persist_noclobber(path).map(drop) };
    result.map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Config(format!("{} exists; use --force to replace it", path.display()))
        } else {
            failed("replace it", e.error)
        }
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s: String = s.chars().filter(|c| *c != ':').collect();
    if s.is_empty() || s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: CertCommand,
    }

    /// Runs `quicseal cert ARGS...` in-process; returns (exit code or error, stdout).
    fn cert(args: &[&str]) -> (quicseal::Result<u8>, String) {
        let cli = Cli::try_parse_from(std::iter::once("cert").chain(args.iter().copied())).expect("arguments parse");
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = run(CertArgs { command: cli.command }, &mut out, &mut err);
        (r, String::from_utf8(out).unwrap())
    }

    fn ok(args: &[&str]) -> String {
        let (r, out) = cert(args);
        assert_eq!(r.unwrap(), 0, "{args:?}: {out}");
        out
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_issue_write_0600_keys_and_refuse_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        ok(&["init", "--name", "Test CA", "--out", d]);
        assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
        assert_eq!(mode(&dir.path().join("ca.crt")), 0o644);
        let before = std::fs::read(dir.path().join("ca.key")).unwrap();
        let (r, _) = cert(&["init", "--name", "Other", "--out", d]);
        assert!(matches!(r, Err(Error::Config(m)) if m.contains("--force")));
        assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), before, "nothing replaced");
        ok(&["issue", "a", "--ip", "127.0.0.1", "--uri", "spiffe://t/a", "--ca-dir", d]);
        assert_eq!(mode(&dir.path().join("a.key")), 0o600);
        let (r, _) = cert(&["issue", "a", "--ca-dir", d]);
        assert!(matches!(r, Err(Error::Config(m)) if m.contains("a.crt exists")));
        for bad in ["../escape", ".hidden", "a/b", ""] {
            let (r, _) = cert(&["issue", bad, "--ca-dir", d]);
            assert!(matches!(r, Err(Error::Config(m)) if m.contains("names the files")), "{bad:?}");
        }
        ok(&["issue", "a", "--ca-dir", d, "--force", "--client-only", "--no-default-san", "--dns", "a.example"]);
        let chain = quicseal::load_certificates(dir.path().join("a.crt")).unwrap();
        assert_eq!(chain.len(), 2, "leaf then CA");
        let peer = quicseal::PeerIdentity::from_certificate(&chain[0]).unwrap();
        assert_eq!(peer.dns_names, ["a.example"]);
        // --force replaced the CA? No: only `init --force` does.
        ok(&["init", "--name", "Replaced", "--out", d, "--force"]);
        assert_ne!(std::fs::read(dir.path().join("ca.key")).unwrap(), before);
        // No temporary files left behind.
        let stray: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".quicseal-"))
            .collect();
        assert!(stray.is_empty());
    }

    #[test]
    fn renew_refuses_a_ca_a_foreign_key_and_a_compromised_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        ok(&["init", "--name", "CA", "--out", d]);
        let (ca_crt, ca_key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
        let before = (std::fs::read(&ca_crt).unwrap(), std::fs::read(&ca_key).unwrap());
        let (r, _) = cert(&["renew", ca_crt.to_str().unwrap(), "--ca-dir", d]);
        assert!(matches!(r, Err(Error::Config(m)) if m.contains("is a CA certificate")));
        let (r, _) = cert(&["renew", ca_crt.to_str().unwrap(), "--ca-dir", d, "--reuse-key"]);
        assert!(r.is_err());
        assert_eq!((std::fs::read(&ca_crt).unwrap(), std::fs::read(&ca_key).unwrap()), before, "the CA is untouched");
        // Issuance from the CA still works, and openssl agrees it is still a CA.
        ok(&["issue", "a", "--ca-dir", d]);
        ok(&["issue", "b", "--ca-dir", d]);
        let out = std::process::Command::new("openssl")
            .args(["verify", "-CAfile", ca_crt.to_str().unwrap(), dir.path().join("a.crt").to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // --reuse-key with another certificate's key.
        let (a_crt, b_key) = (dir.path().join("a.crt"), dir.path().join("b.key"));
        let (r, _) =
            cert(&["renew", a_crt.to_str().unwrap(), "--ca-dir", d, "--reuse-key", "--key", b_key.to_str().unwrap()]);
        assert!(matches!(r, Err(Error::Config(m)) if m.contains("is not the key of")));
        // A key revoked for compromise is not certified again; a new key is fine.
        ok(&["revoke", a_crt.to_str().unwrap(), "--ca-dir", d, "--reason", "key-compromise"]);
        let (r, _) = cert(&["renew", a_crt.to_str().unwrap(), "--ca-dir", d, "--reuse-key"]);
        assert!(matches!(r, Err(Error::Config(m)) if m.contains("key compromise")));
        ok(&["renew", a_crt.to_str().unwrap(), "--ca-dir", d]);
        // The same key under another certificate: revoking one certificate for key compromise
        // refuses the key under the other too.
        let (b_crt, b_old) = (dir.path().join("b.crt"), dir.path().join("b-old.crt"));
        std::fs::copy(&b_crt, &b_old).unwrap();
        ok(&["renew", b_crt.to_str().unwrap(), "--ca-dir", d, "--reuse-key"]);
        ok(&["revoke", b_old.to_str().unwrap(), "--ca-dir", d, "--reason", "key-compromise"]);
        let (r, _) = cert(&["renew", b_crt.to_str().unwrap(), "--ca-dir", d, "--reuse-key"]);
        assert!(matches!(&r, Err(Error::Config(m)) if m.contains("key compromise")), "{r:?}");
    }

    #[test]
    fn clear_errors_for_a_missing_ca_a_foreign_key_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let (r, _) = cert(&["issue", "a", "--ca-dir", d]);
        assert!(matches!(r, Err(Error::Config(m)) if m.contains("ca.crt") && m.contains("cannot read the CA")));
        ok(&["init", "--name", "CA", "--out", d]);
        std::fs::remove_file(dir.path().join("ca.key")).unwrap();
        let (r, _) = cert(&["issue", "a", "--ca-dir", d]);
        assert!(matches!(r, Err(Error::Config(m)) if m.contains("ca.key")));
        // A key that does not belong to the CA certificate.
        let other = tempfile::tempdir().unwrap();
        ok(&["init", "--name", "Other", "--out", other.path().to_str().unwrap()]);
        std::fs::copy(other.path().join("ca.key"), dir.path().join("ca.key")).unwrap();
        let (r, _) = cert(&["issue", "a", "--ca-dir", d]);
        assert!(matches!(r, Err(Error::Config(m)) if m.contains("does not match")));
        // inspect on garbage and on a key.
        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, b"\x00\x01 not pem at all").unwrap();
        let (r, _) = cert(&["inspect", garbage.to_str().unwrap()]);
        assert!(matches!(r, Err(Error::Config(m)) if m.contains("no certificate or CRL")));
        let (r, _) = cert(&["inspect", dir.path().join("ca.key").to_str().unwrap()]);
        assert!(r.is_err());
        let (r, _) = cert(&["inspect", dir.path().join("missing.crt").to_str().unwrap()]);
        assert!(matches!(r, Err(Error::Config(m)) if m.contains("missing.crt")));
        // revoke (or renew) something the CA did not issue.
        ok(&["issue", "x", "--ca-dir", other.path().to_str().unwrap()]);
        let third = tempfile::tempdir().unwrap();
        let t = third.path().to_str().unwrap();
        ok(&["init", "--name", "Third", "--out", t]);
        let x = other.path().join("x.crt");
        let (r, _) = cert(&["revoke", x.to_str().unwrap(), "--ca-dir", t]);
        assert!(matches!(r, Err(Error::Config(m)) if m.contains("was not issued by")));
        let (r, _) = cert(&["renew", x.to_str().unwrap(), "--ca-dir", t]);
        assert!(matches!(r, Err(Error::Config(m)) if m.contains("was not issued by")));
        let (r, _) = cert(&["revoke", "--serial", "zz", "--ca-dir", t]);
        assert!(matches!(r, Err(Error::Config(m)) if m.contains("hex")));
    }

    #[test]
    fn inspect_a_chain_and_a_crl_and_verify_exit_codes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let p = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        ok(&["init", "--name", "Test CA", "--out", d]);
        ok(&["issue", "good", "--ca-dir", d]);
        ok(&["issue", "bad", "--ca-dir", d]);
        let out = ok(&["inspect", &p("good.crt")]);
        assert!(
            out.contains("subject       CN=good") && out.contains("DNS:good") && out.contains("CA certificate"),
            "{out}"
        );
        assert!(out.contains("serverAuth, clientAuth") && out.contains("ECDSA P-256"), "{out}");
        assert!(out.contains("days_left     89") || out.contains("days_left     90"), "{out}");
        let json: serde_json::Value = serde_json::from_str(&ok(&["inspect", &p("good.crt"), "--json"])).unwrap();
        assert_eq!(json[0]["subject"], "CN=good");
        assert_eq!(json[1]["type"], "CA certificate");
        assert_eq!(json[0]["fingerprint"].as_str().unwrap().len(), 64);
        // Revoke one, publish the CRL, inspect it.
        ok(&["revoke", &p("bad.crt"), "--ca-dir", d, "--reason", "key-compromise"]);
        assert!(ok(&["revoke", &p("bad.crt"), "--ca-dir", d]).contains("already revoked"));
        ok(&["crl", "--ca-dir", d]);
        let crl: serde_json::Value = serde_json::from_str(&ok(&["inspect", &p("ca.crl"), "--json"])).unwrap();
        assert_eq!(crl["type"], "CRL");
        let bad_serial = serde_json::from_str::<serde_json::Value>(&ok(&["inspect", &p("bad.crt"), "--json"])).unwrap()
            [0]["serial"]
            .clone();
        assert_eq!(crl["revoked"], serde_json::json!([bad_serial]));
        // verify: good, revoked, wrong name, wrong CA, expired.
        let verify = |args: &[&str]| cert(&[&["verify"], args].concat()).0.unwrap();
        let (ca, crl) = (p("ca.crt"), p("ca.crl"));
        assert_eq!(verify(&[&p("good.crt"), "--ca", &ca, "--crl", &crl]), 0);
        assert_eq!(verify(&[&p("good.crt"), "--ca", &ca, "--name", "good"]), 0);
        assert_eq!(verify(&[&p("bad.crt"), "--ca", &ca, "--crl", &crl]), 4);
        assert_eq!(verify(&[&p("bad.crt"), "--ca", &ca]), 0, "without the CRL it is not known to be revoked");
        assert_eq!(verify(&[&p("good.crt"), "--ca", &ca, "--name", "other"]), 5);
        let other = tempfile::tempdir().unwrap();
        ok(&["init", "--name", "Other CA", "--out", other.path().to_str().unwrap()]);
        assert_eq!(verify(&[&p("good.crt"), "--ca", other.path().join("ca.crt").to_str().unwrap()]), 2);
        let ca_obj = load_ca(dir.path()).unwrap();
        let past = SystemTime::now() - 10 * DAY;
        let expired = ca_obj.issue(&NodeCert::new("old").dns("old").validity(past - DAY, past)).unwrap();
        std::fs::write(dir.path().join("old.crt"), &expired.chain_pem).unwrap();
        assert_eq!(verify(&[&p("old.crt"), "--ca", &ca]), 3);
        let out = ok(&["inspect", &p("old.crt")]);
        assert!(out.contains("warning       EXPIRED"), "{out}");
        let (r, _) = cert(&["verify", &p("missing.crt"), "--ca", &ca]);
        assert!(r.is_err(), "an unreadable file is an error (exit 1), not a verdict");
    }

    #[test]
    fn renew_keeps_the_names_with_a_new_or_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        ok(&["init", "--name", "CA", "--out", d]);
        ok(&["issue", "n", "--ip", "10.1.2.3", "--ca-dir", d, "--days", "10"]);
        let crt = dir.path().join("n.crt");
        let read = || {
            let c = quicseal::load_certificates(&crt).unwrap();
            quicseal::PeerIdentity::from_certificate(&c[0]).unwrap()
        };
        let before = read();
        ok(&["renew", crt.to_str().unwrap(), "--ca-dir", d, "--reuse-key"]);
        let same = read();
        assert_eq!(same.fingerprint, before.fingerprint);
        assert!(same.not_after > before.not_after + 70 * DAY);
        assert_eq!(
            (same.dns_names.clone(), same.ip_addresses.clone()),
            (before.dns_names.clone(), before.ip_addresses.clone())
        );
        ok(&["renew", crt.to_str().unwrap(), "--ca-dir", d]);
        let fresh = read();
        assert_ne!(fresh.fingerprint, before.fingerprint);
        assert_eq!(mode(&dir.path().join("n.key")), 0o600);
        // The renewed pair loads and verifies.
        quicseal::Identity::from_pem_files(&crt, dir.path().join("n.key")).unwrap();
        assert_eq!(
            cert(&["verify", crt.to_str().unwrap(), "--ca", &format!("{d}/ca.crt"), "--name", "10.1.2.3"]).0.unwrap(),
            0
        );
    }
}
