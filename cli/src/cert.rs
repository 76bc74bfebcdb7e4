//! `sluice cert`: a cluster CA and the certificates its nodes and operators use for mutual TLS.
//! Each certificate names one role as a SAN URI (`sluice://ROLE/NAME`). Keys are written 0600.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sluice_proto::tls::{Role, role_uri};

/// Writes a file only its owner may read.
pub fn write_private(path: &Path, data: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data.as_bytes())?;
    Ok(())
}

fn make_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// Valid from yesterday (clocks differ a little between hosts) for `days` days.
fn validity(p: &mut rcgen::CertificateParams, days: u32) {
    use chrono::Datelike;
    let ymd = |d: chrono::DateTime<chrono::Utc>| {
        rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8)
    };
    let now = chrono::Utc::now();
    p.not_before = ymd(now - chrono::Duration::days(1));
    p.not_after = ymd(now + chrono::Duration::days(i64::from(days.max(1))));
}

/// Where `sluice cert issue` writes a node's certificate and key.
pub fn paths_in(dir: &Path, role: &str, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{role}-{name}.pem")),
        dir.join(format!("{role}-{name}.key")),
    )
}

pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

/// Creates the cluster CA in `dir` (refuses to replace one unless `force`).
pub fn init(dir: &Path, days: u32, force: bool) -> anyhow::Result<()> {
    make_dir(dir)?;
    let (cert, key) = ca_paths(dir);
    if cert.exists() && !force {
        bail!(
            "{} exists: a CA is already there (use --force to replace it, which invalidates every certificate it issued)",
            cert.display()
        );
    }
    let kp = rcgen::KeyPair::generate()?;
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "Sluice cluster CA");
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    validity(&mut p, days);
    let c = p.self_signed(&kp)?;
    write_private(&key, &kp.serialize_pem())?;
    write_private(&cert, &c.pem())?;
    println!("CA written: {} (key {})", cert.display(), key.display());
    Ok(())
}

/// Issues a key and certificate for `name` in `role`, signed by the CA in `dir`; returns the
/// certificate and key paths.
pub fn issue(
    dir: &Path,
    out: Option<&Path>,
    role: &str,
    name: &str,
    sans: &[String],
    days: u32,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let role = Role::parse(role).with_context(|| {
        format!("`{role}` is not a role: controller, ingress, worker, operator or viewer")
    })?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("`{name}` is not a usable name (letters, digits, - _ .)");
    }
    let (ca_cert, ca_key) = ca_paths(dir);
    let ca_pem = std::fs::read_to_string(&ca_cert).with_context(|| {
        format!(
            "reading {} (run `sluice cert init` first)",
            ca_cert.display()
        )
    })?;
    let ca_kp = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(&ca_key)
            .with_context(|| format!("reading {}", ca_key.display()))?,
    )?;
    let issuer = rcgen::CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_kp)?;
    let kp = rcgen::KeyPair::generate()?;
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{role} {name}"));
    p.subject_alt_names
        .push(rcgen::SanType::URI(rcgen::Ia5String::try_from(role_uri(
            role, name,
        ))?));
    for s in sans {
        match s.parse::<IpAddr>() {
            Ok(ip) => p.subject_alt_names.push(rcgen::SanType::IpAddress(ip)),
            Err(_) => {
                p.subject_alt_names
                    .push(rcgen::SanType::DnsName(rcgen::Ia5String::try_from(
                        s.as_str(),
                    )?))
            }
        }
    }
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut p, days);
    let c = p.signed_by(&kp, &issuer, &ca_kp)?;
    let out = out.unwrap_or(dir);
    make_dir(out)?;
    let (cert, key) = paths_in(out, role.as_str(), name);
    write_private(&key, &kp.serialize_pem())?;
    write_private(&cert, &c.pem())?;
    Ok((cert, key))
}
