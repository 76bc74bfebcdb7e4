//! DKIM signing at delivery (RFC 6376) with mail-auth: RSA-SHA256 and Ed25519-SHA256 keys in
//! PKCS#1 or PKCS#8 PEM.

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

const SIGNED_HEADERS: [&str; 9] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "MIME-Version",
    "Content-Type",
];

enum Inner {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

pub struct Signer {
    inner: Inner,
}

impl Signer {
    /// Loads a key; a bad key is an error, never a silent unsigned send.
    pub fn new(pem: &str, domain: &str, selector: &str) -> Result<Signer, String> {
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| format!("the DKIM key for {domain} is not a PEM private key: {e}"))?;
        let inner = match RsaKey::<Sha256>::from_key_der(der.clone_key()) {
            Ok(k) => Inner::Rsa(
                DkimSigner::from_key(k)
                    .domain(domain)
                    .selector(selector)
                    .headers(SIGNED_HEADERS),
            ),
            Err(rsa_err) => match &der {
                PrivateKeyDer::Pkcs8(p) => {
                    let k = Ed25519Key::from_pkcs8_maybe_unchecked_der(p.secret_pkcs8_der())
                        .map_err(|e| format!("the DKIM key for {domain} is neither RSA ({rsa_err}) nor Ed25519 ({e})"))?;
                    Inner::Ed25519(
                        DkimSigner::from_key(k)
                            .domain(domain)
                            .selector(selector)
                            .headers(SIGNED_HEADERS),
                    )
                }
                _ => {
                    return Err(format!(
                        "the DKIM key for {domain} is not usable: {rsa_err}"
                    ));
                }
            },
        };
        Ok(Signer { inner })
    }

    /// The DKIM-Signature header field for a message, CRLF-terminated.
    pub fn sign(&self, message: &[u8]) -> Result<String, String> {
        let began = std::time::Instant::now();
        let sig = match &self.inner {
            Inner::Rsa(s) => s.sign(message),
            Inner::Ed25519(s) => s.sign(message),
        }
        .map_err(|e| format!("DKIM signing failed: {e}"))?;
        crate::metrics::METRICS
            .dkim_sign_seconds
            .observe(began.elapsed().as_secs_f64());
        Ok(sig.to_header())
    }
}

/// The domain of the From header, for choosing a key.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(message.len());
    let header = String::from_utf8_lossy(&message[..end]);
    let mut lines = header.split("\r\n").peekable();
    while let Some(l) = lines.next() {
        if l.len() >= 5 && l[..5].eq_ignore_ascii_case("from:") {
            let mut v = l[5..].to_string();
            while lines.peek().is_some_and(|n| n.starts_with([' ', '\t'])) {
                v.push_str(lines.next().unwrap());
            }
            let addr = match (v.rfind('<'), v.rfind('>')) {
                (Some(a), Some(b)) if a < b => v[a + 1..b].to_string(),
                _ => v.trim().to_string(),
            };
            return addr
                .rsplit_once('@')
                .map(|(_, d)| d.trim().to_ascii_lowercase());
        }
    }
    None
}
