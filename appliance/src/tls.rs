//! HTTPS for `appliance serve`: the certificate it presents (reloaded on SIGHUP), and the
//! store's own CA that issues one (`appliance init`, `appliance tls`). The CA certificate is what
//! `bootimg build --ca` bakes into the boot image and `restorer --ca` trusts.
//!
//! Files, in `STORE/private/tls/` (the directory is never served):
//! `ca.pem` (public), `ca.key`, `server.pem`, `server.key` (keys mode 0600).

use anyhow::{anyhow, bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest as _, Sha256};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where a store keeps its TLS files.
pub fn dir(store_root: &Path) -> PathBuf {
    store_root.join("private").join("tls")
}

/// The certificate and key `appliance serve` presents, re-read from their files on SIGHUP.
pub struct Certs {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Certs({})", self.cert.display())
    }
}

impl Certs {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Certs>> {
        let ck = read_pair(cert, key)?;
        Ok(Arc::new(Certs {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Arc::new(ck)),
        }))
    }

    /// Read the files again; on any error the certificate in use stays.
    pub fn reload(&self) -> Result<String> {
        let ck = read_pair(&self.cert, &self.key)?;
        let mut cur = self
            .current
            .write()
            .map_err(|_| anyhow!("certificate lock poisoned"))?;
        *cur = Arc::new(ck);
        Ok(self.cert.display().to_string())
    }

    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

fn read_pair(cert: &Path, key: &Path) -> Result<CertifiedKey> {
    let pem = fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let chain = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: malformed PEM", cert.display()))?;
    if chain.is_empty() {
        bail!("{}: no PEM certificate in it", cert.display());
    }
    let pem = fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    let der = rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("{}: malformed PEM", key.display()))?
        .ok_or_else(|| anyhow!("{}: no PEM private key in it", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(der)
        .with_context(|| format!("{}: unsupported private key", key.display()))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| {
        anyhow!(
            "{} and {} do not belong together: {e}",
            cert.display(),
            key.display()
        )
    })?;
    Ok(ck)
}

/// What [`issue`] made.
pub struct Issued {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub new_ca: bool,
    pub names: Vec<String>,
}

/// Issue the store's server certificate for `names` (host names and IP addresses), signed by
/// the store's CA, which is made first if the store has none. An existing CA is kept, so boot
/// images that carry it keep trusting the appliance.
pub fn issue(store_root: &Path, names: &[String]) -> Result<Issued> {
    if names.is_empty() {
        bail!("a server certificate needs at least one host name or address");
    }
    let d = dir(store_root);
    fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let (ca_pem, ca_key) = (d.join("ca.pem"), d.join("ca.key"));
    let new_ca = !ca_key.exists();
    let ca_pair = if new_ca {
        let k = KeyPair::generate().context("generating the CA key")?;
        write_private(&ca_key, k.serialize_pem().as_bytes())?;
        k
    } else {
        let pem =
            fs::read_to_string(&ca_key).with_context(|| format!("reading {}", ca_key.display()))?;
        KeyPair::from_pem(&pem).with_context(|| format!("{}: not a key", ca_key.display()))?
    };
    // The CA certificate is a function of its key alone, so re-making it to sign with yields the
    // same subject and key identifier as the `ca.pem` boot images carry.
    let ca = ca_params(&ca_pair)?
        .self_signed(&ca_pair)
        .context("making the CA certificate")?;
    if new_ca || !ca_pem.exists() {
        write_atomic(&ca_pem, ca.pem().as_bytes(), 0o644)?;
    }
    let year = this_year();
    let mut p = CertificateParams::new(names.to_vec())
        .with_context(|| format!("certificate names {names:?}"))?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, names[0].as_str());
    p.is_ca = IsCa::NoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(year + 5, 1, 1);
    let key = KeyPair::generate().context("generating the server key")?;
    let cert = p
        .signed_by(&key, &ca, &ca_pair)
        .context("signing the server certificate")?;
    let (cert_path, key_path) = (d.join("server.pem"), d.join("server.key"));
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(Issued {
        ca: ca_pem,
        cert: cert_path,
        key: key_path,
        new_ca,
        names: names.to_vec(),
    })
}

fn ca_params(key: &KeyPair) -> Result<CertificateParams> {
    let id = hex::encode(&Sha256::digest(key.public_key_der())[..8]);
    let mut p = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, format!("bmr appliance CA {id}"));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // Fixed dates keep the certificate a function of the key.
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2045, 1, 1);
    Ok(p)
}

/// The names a certificate made without being told gets: this machine's host name, its
/// addresses (`hostname -I`), and the loopback names.
pub fn default_names() -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(h) = fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            names.push(h.to_string());
        }
    }
    names.push("localhost".into());
    if let Ok(out) = std::process::Command::new("hostname").arg("-I").output() {
        if out.status.success() {
            let s = String::from_utf8_lossy(&out.stdout);
            names.extend(
                s.split_whitespace()
                    .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
                    .map(str::to_string),
            );
        }
    }
    names.extend(["127.0.0.1".to_string(), "::1".to_string()]);
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

fn this_year() -> i32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, bytes, 0o600)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} into place", tmp.display()))
}
