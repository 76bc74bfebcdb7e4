//! DKIM signing at delivery (RFC 6376) with mail-auth: RSA-SHA256 and Ed25519-SHA256 keys in
//! PKCS#1 or PKCS#8 PEM. The RSA private-key operation uses aws-lc-rs, which signs about 1.8x
//! as fast as ring (`docs/benchmarks.md`); Ed25519 stays on mail-auth's ring key. (mail-auth's
//! own `aws-lc-rs` feature would move Ed25519 and hickory's TLS over as well.)

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use mail_auth::common::crypto::{Algorithm, CryptoError, Ed25519Key, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
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

/// An RSA key for mail-auth's signer, signing with aws-lc-rs (RSASSA-PKCS1-v1_5 with SHA-256).
pub(crate) struct AwsLcRsaKey {
    pair: RsaKeyPair,
    rng: SystemRandom,
}

/// RSA key sizes accepted: RFC 8301 has verifiers check keys of up to 4096 bits, so a larger
/// key would fail at receivers (ring, used before, refused them too).
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=4096;

enum RsaKeyError {
    /// Not an RSA key at all (it may be Ed25519).
    NotRsa(String),
    /// An RSA key that is refused: this message says why.
    Refused(String),
}

impl AwsLcRsaKey {
    /// A PKCS#1 or PKCS#8 DER RSA private key.
    fn from_key_der(der: &PrivateKeyDer<'_>) -> Result<Self, RsaKeyError> {
        let size_error = || {
            RsaKeyError::Refused(format!(
                "RSA keys must have {} to {} bits",
                RSA_BITS.start(),
                RSA_BITS.end()
            ))
        };
        let pair = match der {
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            _ => return Err(RsaKeyError::NotRsa("not an RSA key".into())),
        }
        .map_err(|e| match e.description_() {
            "TooSmall" | "TooLarge" => size_error(),
            other => RsaKeyError::NotRsa(format!("not a usable RSA key: {other}")),
        })?;
        if !RSA_BITS.contains(&(pair.public_modulus_len() * 8)) {
            return Err(size_error());
        }
        Ok(AwsLcRsaKey {
            pair,
            rng: SystemRandom::new(),
        })
    }
}

impl SigningKey for AwsLcRsaKey {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        let mut data = Vec::with_capacity(512);
        input.write(&mut data);
        let mut signature = vec![0; self.pair.public_modulus_len()];
        self.pair
            .sign(&RSA_PKCS1_SHA256, &self.rng, &data, &mut signature)
            .map_err(|e| mail_auth::Error::Crypto(CryptoError::Library(e.to_string())))?;
        Ok(signature)
    }

    fn algorithm(&self) -> Algorithm {
        Algorithm::RsaSha256
    }
}

enum Inner {
    Rsa(DkimSigner<AwsLcRsaKey, Done>),
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
        let inner = match AwsLcRsaKey::from_key_der(&der) {
            Err(RsaKeyError::Refused(why)) => {
                return Err(format!("the DKIM key for {domain} is refused: {why}"));
            }
            Ok(k) => Inner::Rsa(
                DkimSigner::from_key(k)
                    .domain(domain)
                    .selector(selector)
                    .headers(SIGNED_HEADERS),
            ),
            Err(RsaKeyError::NotRsa(rsa_err)) => match &der {
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

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
    use std::process::Command;

    fn openssl(args: &[&str]) -> String {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    fn der(pem: &str) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn rsa_keys_in_pkcs1_and_pkcs8_sign_the_same_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let p8 = dir.path().join("k8.pem");
        let p8s = p8.to_str().unwrap();
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            p8s,
        ]);
        let pkcs8 = std::fs::read_to_string(&p8).unwrap();
        let pkcs1 = openssl(&["rsa", "-in", p8s, "-traditional"]);
        assert!(pkcs8.contains("BEGIN PRIVATE KEY"));
        assert!(pkcs1.contains("BEGIN RSA PRIVATE KEY"));
        let key = |pem: &str| match AwsLcRsaKey::from_key_der(&der(pem)) {
            Ok(k) => k,
            Err(RsaKeyError::NotRsa(e) | RsaKeyError::Refused(e)) => panic!("{e}"),
        };
        let (k8, k1) = (key(&pkcs8), key(&pkcs1));
        let data: &[u8] = b"from:a@example.com\r\ndkim-signature:v=1; b=";
        let (s8, s1) = (k8.sign(data).unwrap(), k1.sign(data).unwrap());
        assert_eq!(s8.len(), 256);
        assert_eq!(
            s8, s1,
            "PKCS#1 v1.5 signatures are deterministic for one key"
        );
        let public = UnparsedPublicKey::new(
            &RSA_PKCS1_2048_8192_SHA256,
            aws_lc_rs::signature::KeyPair::public_key(&k8.pair)
                .as_ref()
                .to_vec(),
        );
        public.verify(data, &s8).expect("the signature verifies");
        assert!(public.verify(b"other", &s8).is_err());
        // Both forms make a working DKIM signer.
        for pem in [&pkcs8, &pkcs1] {
            let h = Signer::new(pem, "example.com", "s1")
                .unwrap()
                .sign(b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n")
                .unwrap();
            assert!(
                h.starts_with("DKIM-Signature:") && h.contains("a=rsa-sha256"),
                "{h}"
            );
        }
    }

    #[test]
    fn ed25519_and_bad_keys() {
        let dir = tempfile::tempdir().unwrap();
        let ed = dir.path().join("ed.pem");
        openssl(&[
            "genpkey",
            "-algorithm",
            "ed25519",
            "-out",
            ed.to_str().unwrap(),
        ]);
        let h = Signer::new(&std::fs::read_to_string(&ed).unwrap(), "example.com", "s1")
            .unwrap()
            .sign(b"From: a@example.com\r\n\r\nbody\r\n")
            .unwrap();
        assert!(h.contains("a=ed25519-sha256"), "{h}");
        let ec = dir.path().join("ec.pem");
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            ec.to_str().unwrap(),
        ]);
        let err = Signer::new(&std::fs::read_to_string(&ec).unwrap(), "example.com", "s1")
            .err()
            .unwrap();
        assert!(err.contains("example.com") && err.contains("RSA"), "{err}");
        let err = Signer::new("not a key", "example.com", "s1").err().unwrap();
        assert!(err.contains("not a PEM private key"), "{err}");
        // RSA keys outside 2048..=4096 bits are refused with the reason, in both forms.
        for bits in ["1024", "4160"] {
            let small = dir.path().join(format!("rsa{bits}.pem"));
            let small = small.to_str().unwrap();
            let keygen = format!("rsa_keygen_bits:{bits}");
            openssl(&[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                &keygen,
                "-out",
                small,
            ]);
            let pkcs1 = openssl(&["rsa", "-in", small, "-traditional"]);
            for pem in [std::fs::read_to_string(small).unwrap(), pkcs1] {
                let err = Signer::new(&pem, "example.com", "s1").err().unwrap();
                assert!(
                    err.contains("refused") && err.contains("2048 to 4096 bits"),
                    "{bits} bits: {err}"
                );
            }
        }
    }
}
