//! ed25519 signatures over manifests. Keys and signatures are stored as one line of hex.

use anyhow::{bail, Context, Result};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use std::path::Path;

/// The appliance's signing key.
pub struct Key(SigningKey);

/// A public key that restorers check manifests against.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PublicKey(VerifyingKey);

impl Key {
    pub fn generate() -> Result<Key> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed)
            .map_err(|e| anyhow::anyhow!("reading the system random source: {e}"))?;
        Ok(Key(SigningKey::from_bytes(&seed)))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    pub fn load(path: &Path) -> Result<Key> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading signing key {}", path.display()))?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut seed).map_err(|_| {
            anyhow::anyhow!("{}: not a signing key (64 hex digits)", path.display())
        })?;
        Ok(Key(SigningKey::from_bytes(&seed)))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Detached signature of `data`, as the text stored in `manifest.sig`.
    pub fn sign(&self, data: &[u8]) -> String {
        format!("{}\n", hex::encode(self.0.sign(data).to_bytes()))
    }
}

impl PublicKey {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    pub fn parse(text: &str) -> Result<PublicKey> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut b)
            .map_err(|_| anyhow::anyhow!("not a public key (expected 64 hex digits)"))?;
        Ok(PublicKey(
            VerifyingKey::from_bytes(&b).context("not a valid ed25519 public key")?,
        ))
    }

    /// Load from a file holding the hex key (as `appliance pubkey` prints it).
    pub fn load(path: &Path) -> Result<PublicKey> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading public key {}", path.display()))?;
        PublicKey::parse(&text).with_context(|| format!("{}", path.display()))
    }

    /// Check `sig_text` (contents of `manifest.sig`) over `data`; `origin` names the manifest.
    pub fn verify(&self, data: &[u8], sig_text: &[u8], origin: &str) -> Result<()> {
        let text = std::str::from_utf8(sig_text).unwrap_or("");
        let mut b = [0u8; 64];
        if hex::decode_to_slice(text.trim(), &mut b).is_err() {
            bail!("{origin}: malformed signature file");
        }
        if self.0.verify(data, &Signature::from_bytes(&b)).is_err() {
            bail!("{origin}: signature does not match the public key (manifest tampered with or signed by another appliance)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_tamper() {
        let k = Key::generate().unwrap();
        let sig = k.sign(b"manifest");
        let p = PublicKey::parse(&k.public().to_hex()).unwrap();
        p.verify(b"manifest", sig.as_bytes(), "m").unwrap();
        assert!(p.verify(b"manifesT", sig.as_bytes(), "m").is_err());
        assert!(p.verify(b"manifest", b"zz", "m").is_err());
        let other = Key::generate().unwrap();
        assert!(other
            .public()
            .verify(b"manifest", sig.as_bytes(), "m")
            .is_err());
    }
}
