//! Certificate lifetimes and hot reload: [`Expiry`] says when this node's certificate and its
//! CAs run out; [`Node::watch`](crate::Node::watch) reloads certificate, key, CA and CRL files
//! when they change, without a restart.
//!
//! The watcher polls: every interval it reads the files and compares their contents (SHA-256)
//! with what it loaded last. Polling works the same for files edited in place, replaced by
//! rename, or swapped behind a symlink (as Kubernetes does with secrets), on every platform,
//! and a change is picked up within one interval. A file that is missing, half-written or does
//! not match its partner (a new certificate with the old key) is reported
//! ([`WatchStatus::last_error`], a `warn` log) and the node keeps its last good material; the
//! next poll tries again.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::error::Result;
use crate::identity::{Fingerprint, Identity, TrustStore};

/// Expiry is logged as a warning when it is closer than this.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// One certificate's end of validity.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CertExpiry {
    /// The certificate's subject (its common name, or the whole subject).
    pub subject: String,
    /// SHA-256 of its public key.
    pub fingerprint: Fingerprint,
    /// End of validity.
    pub not_after: SystemTime,
    /// Whole days left (negative once expired).
    pub days_left: i64,
}

impl CertExpiry {
    fn of(der: &[u8], now: SystemTime) -> Option<CertExpiry> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let not_after = cert.validity().not_after.timestamp();
        let now = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let subject = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| cert.subject().to_string());
        Some(CertExpiry {
            subject,
            fingerprint: Fingerprint::of_spki(cert.tbs_certificate.subject_pki.raw),
            not_after: if not_after >= 0 { UNIX_EPOCH + Duration::from_secs(not_after as u64) } else { UNIX_EPOCH },
            days_left: (not_after - now).div_euclid(86_400),
        })
    }

    /// Whether it has expired.
    pub fn is_expired(&self) -> bool {
        self.not_after <= SystemTime::now()
    }
}

/// When a node's own certificate and the CAs it trusts expire.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Expiry {
    /// The node's own (leaf) certificate.
    pub certificate: CertExpiry,
    /// Each trusted CA certificate.
    pub cas: Vec<CertExpiry>,
}

impl Expiry {
    /// Reads the expiry of an identity and a trust store.
    pub fn of(identity: &Identity, trust: &TrustStore) -> Expiry {
        let now = SystemTime::now();
        let certificate = CertExpiry::of(&identity.chain()[0], now).unwrap_or(CertExpiry {
            subject: String::new(),
            fingerprint: identity.fingerprint(),
            not_after: UNIX_EPOCH,
            days_left: 0,
        });
        Expiry { certificate, cas: trust.cas().iter().filter_map(|c| CertExpiry::of(c, now)).collect() }
    }

    /// The certificates (own first, then CAs) that expire within `within` or have expired.
    pub fn expiring_within(&self, within: Duration) -> Vec<&CertExpiry> {
        let horizon = SystemTime::now() + within;
        std::iter::once(&self.certificate).chain(&self.cas).filter(|c| c.not_after <= horizon).collect()
    }

    /// Logs a warning for each certificate expiring within [`EXPIRY_WARNING`].
    pub(crate) fn log_warnings(&self) {
        for (i, c) in std::iter::once(&self.certificate).chain(&self.cas).enumerate() {
            let what = if i == 0 { "this node's certificate" } else { "a trusted CA certificate" };
            if c.is_expired() {
                warn!(subject = %c.subject, days_left = c.days_left, "{what} has expired");
            } else if c.not_after <= SystemTime::now() + EXPIRY_WARNING {
                warn!(subject = %c.subject, days_left = c.days_left, "{what} expires soon");
            }
        }
    }
}

/// The files a node's TLS material comes from, for [`Node::watch`](crate::Node::watch).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CertFiles {
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA certificates (PEM).
    pub ca: PathBuf,
    /// CRLs (PEM); each must exist once listed.
    pub crls: Vec<PathBuf>,
    /// SPIFFE trust bundles: (trust domain, PEM file of its CAs); see
    /// [`TrustStore::add_bundle_file`].
    pub bundles: Vec<(String, PathBuf)>,
    /// How often the files are read. Default 5 s.
    pub interval: Duration,
}

impl CertFiles {
    /// The node's certificate, key and CA files, no CRL, checked every 5 s.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>, ca: impl Into<PathBuf>) -> CertFiles {
        CertFiles {
            cert: cert.into(),
            key: key.into(),
            ca: ca.into(),
            crls: Vec::new(),
            bundles: Vec::new(),
            interval: Duration::from_secs(5),
        }
    }

    /// Adds a CRL file.
    pub fn crl(mut self, path: impl Into<PathBuf>) -> CertFiles {
        self.crls.push(path.into());
        self
    }

    /// Adds the trust bundle of SPIFFE trust domain `domain` (a PEM file of its CAs).
    pub fn bundle(mut self, domain: impl Into<String>, path: impl Into<PathBuf>) -> CertFiles {
        self.bundles.push((domain.into(), path.into()));
        self
    }

    /// Sets how often the files are read.
    pub fn interval(mut self, interval: Duration) -> CertFiles {
        self.interval = interval;
        self
    }

    /// Loads the files: identity and trust store (the node adds its deny-list when it reloads).
    pub fn load(&self) -> Result<(Identity, TrustStore)> {
        let identity = Identity::from_pem_files(&self.cert, &self.key)?;
        let mut trust = TrustStore::from_ca_file(&self.ca)?;
        for (domain, path) in &self.bundles {
            trust.add_bundle_file(domain, path)?;
        }
        for crl in &self.crls {
            trust.add_crl_file(crl)?;
        }
        Ok((identity, trust))
    }

    /// SHA-256 over every file's contents (unreadable files count as empty), to notice changes.
    fn digest(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let bundles = self.bundles.iter().map(|(_, path)| path);
        for path in [&self.cert, &self.key, &self.ca].into_iter().chain(&self.crls).chain(bundles) {
            let bytes = std::fs::read(path).unwrap_or_default();
            ctx.update(&(bytes.len() as u64).to_be_bytes());
            ctx.update(&bytes);
        }
        ctx.finish().as_ref().try_into().expect("32 bytes")
    }
}

/// What a certificate watcher has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WatchStatus {
    /// Times the files were read.
    pub checks: u64,
    /// Times the node took new material from them.
    pub reloads: u64,
    /// Times changed files could not be used (the node kept its last good material).
    pub failures: u64,
    /// Why the last failure happened, until the files are usable again (or back to what the
    /// node runs on).
    pub last_error: Option<String>,
}

/// A running certificate watcher ([`Node::watch`](crate::Node::watch)); dropping it stops it.
#[derive(Debug)]
pub struct CertWatcher {
    task: JoinHandle<()>,
    status: Arc<Mutex<WatchStatus>>,
}

impl CertWatcher {
    pub(crate) fn new(task: JoinHandle<()>, status: Arc<Mutex<WatchStatus>>) -> CertWatcher {
        CertWatcher { task, status }
    }

    /// What it has done so far.
    pub fn status(&self) -> WatchStatus {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for CertWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a certificate watcher reloads (the node): `None` from its upgrade once it is gone.
pub(crate) trait Reloadable: Send + 'static {
    /// Puts new identity and trust in place for new handshakes.
    fn reload(&self, identity: Identity, trust: TrustStore) -> Result<()>;
    /// The expiry of what it runs on now.
    fn expiry(&self) -> Expiry;
}

/// Starts a watcher of `files` that reloads what `target` returns, until it returns `None`
/// (see [`Node::watch`](crate::Node::watch), which documents the behaviour). Must be called
/// inside a tokio runtime.
pub(crate) fn watch<T: Reloadable>(files: CertFiles, target: impl Fn() -> Option<T> + Send + 'static) -> CertWatcher {
    let status = Arc::new(Mutex::new(WatchStatus::default()));
    let task = tokio::spawn({
        let status = status.clone();
        async move {
            let mut loaded = files.digest();
            // The contents that failed last, not tried again until they change.
            let mut failed = None;
            let mut warned_at = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(files.interval.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(node) = target() else { return };
                let now = files.digest();
                let mut st = status.lock().unwrap_or_else(|e| e.into_inner());
                st.checks += 1;
                if now == loaded {
                    // Back to the files the node runs on (a bad edit was undone).
                    st.last_error = None;
                    failed = None;
                } else if failed != Some(now) {
                    // The node keeps its deny-list across reloads (see `Node::reload`).
                    let result = files.load().and_then(|(identity, trust)| node.reload(identity, trust));
                    match result {
                        Ok(()) => {
                            loaded = now;
                            failed = None;
                            st.reloads += 1;
                            st.last_error = None;
                            info!(cert = %files.cert.display(), "certificate files changed: reloaded");
                        }
                        Err(e) => {
                            failed = Some(now);
                            st.failures += 1;
                            warn!(error = %e, "certificate files changed but cannot be used: keeping the last good ones");
                            st.last_error = Some(e.to_string());
                        }
                    }
                }
                drop(st);
                if warned_at.elapsed() >= Duration::from_secs(24 * 3600) {
                    warned_at = tokio::time::Instant::now();
                    node.expiry().log_warnings();
                }
            }
        }
    });
    CertWatcher::new(task, status)
}
