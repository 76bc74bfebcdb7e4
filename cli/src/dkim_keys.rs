//! DKIM keys `sluice up` makes on first run: the repository ships no private key, so the
//! example policy's `domain-key` names a file that does not exist yet. Each missing key file
//! gets a new 2048-bit RSA key (mode 0600) and, beside it, `FILE.txt` with the DNS TXT record
//! to publish at `SELECTOR._domainkey.DOMAIN`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sluice_common::policy::{self, LoadOptions};

/// Generates the missing key files the policy names; returns those it made.
pub fn make_missing(policy_path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let loaded = policy::load(policy_path, LoadOptions { read_files: false })
        .map_err(|e| anyhow::anyhow!("the policy does not load:\n{e}"))?;
    let base = policy_path.parent().unwrap_or(Path::new("."));
    let p = &loaded.policy;
    let mut made = Vec::new();
    for k in p
        .domain_keys
        .iter()
        .chain(p.vmtas.values().flat_map(|v| v.domain_keys.iter()))
    {
        let path = if Path::new(&k.key_file).is_absolute() {
            PathBuf::from(&k.key_file)
        } else {
            base.join(&k.key_file)
        };
        if path.exists() || made.contains(&path) {
            continue;
        }
        let txt = generate(&path)?;
        println!(
            "Generated the DKIM key {} (publish {}._domainkey.{} TXT \"{}\")",
            path.display(),
            k.selector,
            k.domain,
            txt
        );
        made.push(path);
    }
    Ok(made)
}

/// Writes a new RSA key to `path` and its TXT record to `path.txt`; returns the record.
fn generate(path: &Path) -> anyhow::Result<String> {
    use base64::Engine;
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).context("making an RSA key")?;
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .context("encoding the key")?;
    let public = key
        .to_public_key()
        .to_public_key_der()
        .context("encoding the public key")?;
    let txt = format!(
        "v=DKIM1; k=rsa; p={}",
        base64::engine::general_purpose::STANDARD.encode(public.as_bytes())
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::cert::write_private(path, &pem)?;
    let mut txt_path = path.as_os_str().to_owned();
    txt_path.push(".txt");
    std::fs::write(&txt_path, format!("{txt}\n"))
        .with_context(|| format!("writing {}", PathBuf::from(&txt_path).display()))?;
    Ok(txt)
}
