//! [`CaDir`]: the CA directory that `quicseal cert` keeps, as a library type.
//!
//! A CA directory holds:
//! - `ca.crt` and `ca.key` (mode 0600): the CA;
//! - `issued`: one line per certificate issued or renewed from it (serial in hex, Unix time of
//!   the end of validity, name), which is what a revocation by serial is checked against;
//! - `revoked`: one line per revoked certificate (serial in hex, Unix time of revocation,
//!   reason, and the key's fingerprint when it was revoked from the certificate, so that a key
//!   revoked for compromise is never certified again);
//! - `ca.crl`: the CRL, signed by the CA, listing every revoked certificate.
//!
//! Every file is written to a temporary file beside it and renamed into place, so a failure
//! never leaves a partial file, and keys are created with mode 0600 in the same step.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::RevocationReason;

use super::{Ca, Revoked};
use crate::error::{Error, Result};
use crate::identity::Fingerprint;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// A CA directory (see the module docs for its files).
pub struct CaDir {
    dir: PathBuf,
    ca: Ca,
}

impl std::fmt::Debug for CaDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaDir").field("dir", &self.dir).finish()
    }
}

/// One line of a CA directory's `revoked` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Serial number of the revoked certificate (big-endian).
    pub serial: Vec<u8>,
    /// When it was revoked (whole seconds).
    pub at: SystemTime,
    /// Why.
    pub reason: RevocationReason,
    /// The revoked certificate's key, when it was revoked from the certificate (not by serial).
    pub key: Option<Fingerprint>,
}

impl CaDir {
    /// Writes `ca` into `dir` as a new CA directory (`ca.key` with mode 0600, then `ca.crt`).
    /// Refuses when either file exists, unless `force`.
    pub fn create(dir: impl Into<PathBuf>, ca: Ca, force: bool) -> Result<CaDir> {
        let dir = dir.into();
        let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        refuse_existing(&[&crt, &key], force)?;
        write_atomic(&key, ca.key_pem(), 0o600, force)?;
        write_atomic(&crt, ca.cert_pem(), 0o644, force)?;
        Ok(CaDir { dir, ca })
    }

    /// Opens the CA directory `dir` (reads `ca.crt` and `ca.key`, and checks they match).
    pub fn open(dir: impl Into<PathBuf>) -> Result<CaDir> {
        let dir = dir.into();
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| file_error(&path, format!("cannot read the CA: {e}")))
        };
        let (cert, key) = (read("ca.crt")?, read("ca.key")?);
        let ca = Ca::from_pem(&cert, &key).map_err(|e| file_error(&dir, e.to_string()))?;
        Ok(CaDir { dir, ca })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The CA.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// When the CA certificate stops being valid.
    pub fn ca_not_after(&self) -> Result<SystemTime> {
        use x509_parser::prelude::FromDer;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(self.ca.cert_der())
            .map_err(|e| file_error(&self.dir.join("ca.crt"), format!("the CA certificate does not parse: {e}")))?;
        let secs = cert.validity().not_after.timestamp();
        Ok(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
    }

    /// The end of validity of a certificate issued now for `days`; an error when it would
    /// outlive the CA (nodes would hold a certificate that fails once the CA expires), which
    /// says how many days the CA has left.
    pub fn leaf_not_after(&self, days: u32) -> Result<SystemTime> {
        let now = SystemTime::now();
        let (not_after, ca_end) = (now + DAY * days, self.ca_not_after()?);
        if not_after > ca_end {
            let left = ca_end.duration_since(now).map(|d| d.as_secs() / 86_400).unwrap_or(0);
            return Err(file_error(
                &self.dir,
                format!(
                    "--days {days}: the certificate would outlive the CA (valid {left} more days): give --days \
                     {left} or less, or make a new CA (`cert init --out NEWDIR`)"
                ),
            ));
        }
        Ok(not_after)
    }

    /// Records a certificate issued (or renewed) from this CA in the `issued` list.
    pub fn record_issued(&self, serial: &[u8], name: &str, not_after: SystemTime) -> Result<()> {
        let path = self.dir.join("issued");
        let mut text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                "# serial not-after-unix-time name (quicseal cert issue and renew)\n".to_owned()
            }
            Err(e) => return Err(file_error(&path, format!("cannot read it: {e}"))),
        };
        let until = not_after.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let _ = writeln!(text, "{} {until} {name}", hex(serial));
        write_atomic(&path, &text, 0o644, true)
    }

    /// Whether the `issued` list holds `serial`.
    pub fn was_issued(&self, serial: &[u8]) -> Result<bool> {
        let path = self.dir.join("issued");
        match std::fs::read_to_string(&path) {
            Ok(t) => {
                Ok(t.lines().filter_map(|l| l.split_whitespace().next()).any(|s| unhex(s).as_deref() == Some(serial)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(file_error(&path, format!("cannot read it: {e}"))),
        }
    }

    /// The `revoked` list (empty when there is none yet).
    pub fn revocations(&self) -> Result<Vec<Revocation>> {
        let path = self.dir.join("revoked");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(file_error(&path, format!("cannot read it: {e}"))),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .enumerate()
            .map(|(i, line)| {
                let bad = || file_error(&path, format!("line {}: expected `SERIAL UNIX-TIME REASON`", i + 1));
                let mut f = line.split_whitespace();
                let serial = unhex(f.next().ok_or_else(bad)?).ok_or_else(bad)?;
                let at: u64 = f.next().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
                let reason = reason_of(f.next().unwrap_or("Unspecified"));
                let key = f.next().map(|k| k.parse().map_err(|_| bad())).transpose()?;
                Ok(Revocation { serial, at: UNIX_EPOCH + Duration::from_secs(at), reason, key })
            })
            .collect()
    }

    /// Adds a revocation to the `revoked` list; false if that serial was revoked already.
    pub fn revoke(&self, revocation: Revocation) -> Result<bool> {
        let mut list = self.revocations()?;
        if list.iter().any(|r| r.serial == revocation.serial) {
            return Ok(false);
        }
        list.push(revocation);
        let mut text = String::from("# serial unix-time reason [key-fingerprint] (quicseal cert revoke)\n");
        for r in &list {
            let at = r.at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let _ = write!(text, "{} {at} {:?}", hex(&r.serial), r.reason);
            if let Some(key) = &r.key {
                let _ = write!(text, " {key}");
            }
            text.push('\n');
        }
        write_atomic(&self.dir.join("revoked"), &text, 0o644, true)?;
        Ok(true)
    }

    /// Whether a certificate with this serial, or any certificate of this key, was revoked for
    /// key compromise: such a key is never certified again.
    pub fn key_compromised(&self, serial: &[u8], key: Fingerprint) -> Result<bool> {
        Ok(self
            .revocations()?
            .iter()
            .any(|r| r.reason == RevocationReason::KeyCompromise && (r.serial == serial || r.key == Some(key))))
    }

    /// Writes `ca.crl`: every revocation, signed by the CA, next update in `days`. Returns its
    /// path and how many certificates it lists.
    pub fn write_crl(&self, days: u32) -> Result<(PathBuf, usize)> {
        let revoked: Vec<Revoked> = self
            .revocations()?
            .into_iter()
            .map(|r| Revoked { serial: r.serial, revoked_at: r.at, reason: Some(r.reason) })
            .collect();
        let now = SystemTime::now();
        // The CRL number must grow with every CRL: the issue time in seconds does.
        let number = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let pem = self.ca.crl(&revoked, number, now - Duration::from_secs(60), now + DAY * days)?;
        let path = self.dir.join("ca.crl");
        write_atomic(&path, &pem, 0o644, true)?;
        Ok((path, revoked.len()))
    }
}

/// A revocation reason by the name the `revoked` file uses (its `Debug` form).
fn reason_of(name: &str) -> RevocationReason {
    use RevocationReason as R;
    match name {
        "KeyCompromise" => R::KeyCompromise,
        "CaCompromise" => R::CaCompromise,
        "AffiliationChanged" => R::AffiliationChanged,
        "Superseded" => R::Superseded,
        "CessationOfOperation" => R::CessationOfOperation,
        "CertificateHold" => R::CertificateHold,
        "PrivilegeWithdrawn" => R::PrivilegeWithdrawn,
        "AaCompromise" => R::AaCompromise,
        _ => R::Unspecified,
    }
}

fn file_error(path: &Path, reason: String) -> Error {
    Error::File { path: path.to_owned(), reason }
}

/// Refuses when any of `paths` exists, unless `force`: checked for every output before the
/// first is written, so a refused command writes nothing.
pub fn refuse_existing(paths: &[&Path], force: bool) -> Result<()> {
    if force {
        return Ok(());
    }
    for p in paths {
        if p.exists() {
            return Err(file_error(p, "already exists; use --force to replace it".into()));
        }
    }
    Ok(())
}

/// Writes `contents` to a new temporary file in `path`'s directory, created with `mode` on Unix
/// (no window where a key is readable by others), then moves it to `path`: with `replace`, by
/// rename over what is there; without, refusing if `path` exists (atomically: no
/// check-then-write race).
pub fn write_atomic(path: &Path, contents: &str, mode: u32, replace: bool) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let failed = |what: &str, e: std::io::Error| file_error(path, format!("cannot {what}: {e}"));
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, format!("cannot create the directory: {e}")))?;
    let mut builder = tempfile::Builder::new();
    builder.prefix(".quicseal-");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(mode));
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut tmp = builder.tempfile_in(dir).map_err(|e| failed("write a file beside it", e))?;
    tmp.write_all(contents.as_bytes()).map_err(|e| failed("write", e))?;
    tmp.as_file().sync_all().map_err(|e| failed("write", e))?;
    let result = if replace { tmp.persist(path).map(drop) } else { tmp.persist_noclobber(path).map(drop) };
    result.map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            file_error(path, "already exists; use --force to replace it".into())
        } else {
            failed("replace it", e.error)
        }
    })
}

/// A serial number in lower-case hex, as the CA directory's files write it.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A serial number from hex (colons allowed, as openssl prints them).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s: String = s.chars().filter(|c| *c != ':').collect();
    if s.is_empty() || s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::KeyType;

    #[test]
    fn a_ca_directory_round_trips_issued_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("dir CA", KeyType::EcdsaP256, DAY * 30).unwrap();
        let created = CaDir::create(dir.path(), ca, false).unwrap();
        assert!(CaDir::create(dir.path(), Ca::new("again", KeyType::EcdsaP256, DAY).unwrap(), false).is_err());
        let opened = CaDir::open(dir.path()).unwrap();
        assert_eq!(opened.ca().cert_pem(), created.ca().cert_pem());
        // A leaf may not outlive the CA.
        assert!(opened.leaf_not_after(10).is_ok());
        let e = opened.leaf_not_after(31).unwrap_err();
        assert!(e.to_string().contains("outlive the CA"), "{e}");
        opened.record_issued(&[1, 2], "a", SystemTime::now()).unwrap();
        assert!(opened.was_issued(&[1, 2]).unwrap() && !opened.was_issued(&[3]).unwrap());
        let key = Fingerprint::of_spki(b"key");
        let r = Revocation {
            serial: vec![1, 2],
            at: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            reason: RevocationReason::KeyCompromise,
            key: Some(key),
        };
        assert!(opened.revoke(r.clone()).unwrap());
        assert!(!opened.revoke(r.clone()).unwrap(), "revoked once");
        assert_eq!(opened.revocations().unwrap(), vec![r]);
        assert!(
            opened.key_compromised(&[9], key).unwrap()
                && opened.key_compromised(&[1, 2], Fingerprint::of_spki(b"x")).unwrap()
        );
        let (path, n) = opened.write_crl(7).unwrap();
        assert_eq!(n, 1);
        assert!(std::fs::read_to_string(path).unwrap().contains("BEGIN X509 CRL"));
        // A damaged list is an error that names the file and the line.
        std::fs::write(dir.path().join("revoked"), "zz\n").unwrap();
        let e = opened.revocations().unwrap_err().to_string();
        assert!(e.contains("revoked") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn serials_in_hex_with_or_without_colons() {
        assert_eq!(unhex("0a:ff"), Some(vec![0x0a, 0xff]));
        assert_eq!(unhex("0aff"), Some(vec![0x0a, 0xff]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex(""), None);
        assert_eq!(hex(&[0x0a, 0xff]), "0aff");
    }
}
