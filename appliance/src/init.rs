//! `appliance init`, `pubkey` and `tls`: a new store with its signing key and HTTPS CA, and the
//! server certificate that CA issues.

use crate::cli::{InitArgs, StoreArgs, TlsArgs};
use crate::tls;
use anyhow::{Context, Result};
use snapshot::store::LocalStore;

pub fn init(a: &InitArgs) -> Result<()> {
    let (_, key) = LocalStore::init(&a.store)?;
    println!("store created at {}", a.store.display());
    println!(
        "signing key: {}/private/signing.key (keep it private)",
        a.store.display()
    );
    println!("public key:  {}", key.to_hex());
    let mut names = tls::default_names();
    names.extend(a.tls_name.iter().cloned());
    let issued = tls::issue(&a.store, &dedup(names)).context("making the store's HTTPS CA")?;
    print_issued(&issued);
    Ok(())
}

pub fn pubkey(a: &StoreArgs) -> Result<()> {
    println!("{}", LocalStore::open(&a.store)?.public_key()?.to_hex());
    Ok(())
}

pub fn tls(a: &TlsArgs) -> Result<()> {
    LocalStore::open(&a.store)?;
    let mut names = a.name.clone();
    if names.is_empty() || a.with_defaults {
        names.extend(tls::default_names());
    }
    let issued = tls::issue(&a.store, &dedup(names))?;
    print_issued(&issued);
    println!("a running `appliance serve --tls` loads it on SIGHUP");
    Ok(())
}

fn dedup(mut names: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| !n.is_empty() && seen.insert(n.clone()));
    names
}

fn print_issued(i: &tls::Issued) {
    let made = if i.new_ca { "new" } else { "kept" };
    println!(
        "HTTPS CA:    {} ({made}; give it to `bootimg build --ca` and `restorer --ca`)",
        i.ca.display()
    );
    println!(
        "certificate: {} for {} (`appliance serve --tls`; key {})",
        i.cert.display(),
        i.names.join(", "),
        i.key.display()
    );
}
