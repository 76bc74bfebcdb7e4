//! DKIM signing throughput of the worker's signer, against `openssl speed` on the same
//! machine in the same run. Keys are made with `openssl genpkey` in a temporary folder.
//!
//! cargo run --release -p sluice-worker --example dkim_bench [-- --size 5120 --seconds 3]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_worker::dkim::Signer;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `openssl speed`'s signs per second for one core.
fn openssl_speed(alg: &str, seconds: u64) -> f64 {
    let out = Command::new("openssl")
        .args(["speed", "-seconds", &seconds.to_string(), alg])
        .output()
        .expect("openssl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    // The last line: "... sign verify sign/s verify/s"; sign/s is the second number from the end.
    let last = text.lines().last().unwrap_or("");
    let nums: Vec<f64> = last
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    nums.get(nums.len().wrapping_sub(2)).copied().unwrap_or(0.0)
}

fn key(dir: &std::path::Path, args: &[&str], name: &str) -> String {
    let path = dir.join(name);
    let ok = Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .arg("-out")
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs")
        .success();
    assert!(ok, "openssl genpkey {args:?}");
    std::fs::read_to_string(path).unwrap()
}

/// Signatures per second with `threads` threads signing for `seconds`.
fn rate(signer: &Arc<Signer>, message: &Arc<Vec<u8>>, threads: usize, seconds: u64) -> f64 {
    let end = Instant::now() + Duration::from_secs(seconds);
    let began = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (s, m) = (signer.clone(), message.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < end {
                    s.sign(&m).unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    total as f64 / began.elapsed().as_secs_f64()
}

/// ring's own signatures per second on one thread (a 32-byte digest-sized input), to tell the
/// crypto library's cost from the signer's.
fn ring_rate(pem: &str, seconds: u64) -> f64 {
    use ring::signature::{Ed25519KeyPair, RSA_PKCS1_SHA256, RsaKeyPair};
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
    let data = [7u8; 32];
    let rng = ring::rand::SystemRandom::new();
    let end = Instant::now() + Duration::from_secs(seconds);
    let began = Instant::now();
    let mut n = 0u64;
    match RsaKeyPair::from_pkcs8(der.secret_der()) {
        Ok(k) => {
            let mut sig = vec![0; k.public().modulus_len()];
            while Instant::now() < end {
                k.sign(&RSA_PKCS1_SHA256, &rng, &data, &mut sig).unwrap();
                n += 1;
            }
        }
        Err(_) => {
            let k = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_der()).unwrap();
            while Instant::now() < end {
                std::hint::black_box(k.sign(&data));
                n += 1;
            }
        }
    }
    n as f64 / began.elapsed().as_secs_f64()
}

/// aws-lc-rs's own RSA signatures per second on one thread (the library the signer uses for
/// RSA); `None` for other keys.
fn aws_lc_rate(pem: &str, seconds: u64) -> Option<f64> {
    use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
    let k = RsaKeyPair::from_pkcs8(der.secret_der()).ok()?;
    let data = [7u8; 32];
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let mut sig = vec![0; k.public_modulus_len()];
    let end = Instant::now() + Duration::from_secs(seconds);
    let began = Instant::now();
    let mut n = 0u64;
    while Instant::now() < end {
        k.sign(&RSA_PKCS1_SHA256, &rng, &data, &mut sig).unwrap();
        n += 1;
    }
    Some(n as f64 / began.elapsed().as_secs_f64())
}

fn main() {
    let size = arg("--size", 5120) as usize;
    let seconds = arg("--seconds", 3);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = tempfile::tempdir().unwrap();
    let mut message =
        b"From: a@example.com\r\nTo: b@example.net\r\nSubject: bench\r\nMessage-ID: <1@example.com>\r\n\r\n"
            .to_vec();
    while message.len() < size {
        message.extend_from_slice(
            b"0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n",
        );
    }
    let message = Arc::new(message);
    println!(
        "| key | openssl speed, signs/s on 1 core | ring alone, 1 thread | aws-lc-rs alone, 1 thread | Sluice signer, 1 thread ({} KB) | vs openssl | Sluice signer, {cores} threads |",
        size / 1024
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, genpkey, alg) in [
        (
            "RSA-2048",
            vec!["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            "rsa2048",
        ),
        ("Ed25519", vec!["-algorithm", "ed25519"], "ed25519"),
    ] {
        let pem = key(dir.path(), &genpkey, &format!("{alg}.pem"));
        let signer = Arc::new(Signer::new(&pem, "example.com", "bench").unwrap());
        let openssl = openssl_speed(alg, seconds);
        let ring = ring_rate(&pem, seconds);
        let aws_lc = aws_lc_rate(&pem, seconds).map_or("-".to_string(), |r| format!("{r:.0}"));
        let one = rate(&signer, &message, 1, seconds);
        let all = rate(&signer, &message, cores, seconds);
        println!(
            "| {name} | {openssl:.0} | {ring:.0} | {aws_lc} | {one:.0} | {:.0}% | {all:.0} |",
            100.0 * one / openssl.max(1.0)
        );
    }
}
