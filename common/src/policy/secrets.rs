//! Secrets in the policy (smtp-user passwords, DKIM private keys) and the views of the policy
//! each role is served: ingress gets password hashes and no DKIM key, a worker gets the DKIM
//! keys of the VMTAs it sends from and no smtp-user, an operator sees no secret at all.

use std::net::IpAddr;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHasher, PasswordVerifier, SaltString};

use super::model::{PasswordHash, Policy};

/// What an operator sees where a secret was.
pub const HIDDEN: &str = "(hidden)";

/// Compares two byte strings in time that depends only on their lengths.
pub fn same_bytes(want: &[u8], got: &[u8]) -> bool {
    let mut diff = want.len() ^ got.len();
    for i in 0..want.len().max(got.len()) {
        diff |= usize::from(want.get(i).copied().unwrap_or(0) ^ got.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// Whether `hash` is a PHC string this build can verify (argon2).
pub fn check_hash(hash: &str) -> Result<(), String> {
    let h = argon2::PasswordHash::new(hash)
        .map_err(|e| format!("`{hash}` is not a password hash in PHC form ({e})"))?;
    match h.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => Ok(()),
        other => Err(format!(
            "password hashes must be argon2 (`sluice config hash-password` makes one), not {other}"
        )),
    }
}

/// Verifies a password against an argon2 PHC string.
pub fn verify(hash: &str, password: &str) -> bool {
    match argon2::PasswordHash::new(hash) {
        Ok(h) => argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// Hashes a password with argon2id and a random salt.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters and a generated salt")
        .to_string()
}

impl Policy {
    /// What an ingress node needs: smtp-users with password hashes only (plain passwords are
    /// hashed here, so they never cross the network), and no DKIM key.
    pub fn for_ingress(&self) -> Policy {
        let mut p = self.clone();
        for u in p.smtp_users.values_mut() {
            if let Some(plain) = u.password.take() {
                u.password_hash = Some(PasswordHash(hash_password(&plain)));
            }
        }
        p.domain_keys.clear();
        for v in p.vmtas.values_mut() {
            v.domain_keys.clear();
        }
        p
    }

    /// What a worker sending from `ips` needs: the DKIM keys of the VMTAs on those IPs (and the
    /// global `domain-key`s, which every VMTA signs with, when it owns any VMTA); no smtp-user.
    pub fn for_worker(&self, ips: &[IpAddr]) -> Policy {
        let mut p = self.clone();
        p.smtp_users.clear();
        let mut owns_any = false;
        for v in p.vmtas.values_mut() {
            if v.source_ip.is_some_and(|ip| ips.contains(&ip)) {
                owns_any = true;
            } else {
                v.domain_keys.clear();
            }
        }
        if !owns_any {
            p.domain_keys.clear();
        }
        p
    }

    /// The policy with every secret replaced by `(hidden)`, for `config check --json` and
    /// anything else an operator reads.
    pub fn redacted(&self) -> Policy {
        let mut p = self.clone();
        for u in p.smtp_users.values_mut() {
            if u.password.is_some() {
                u.password = Some(HIDDEN.into());
            }
            if u.password_hash.is_some() {
                u.password_hash = Some(PasswordHash(HIDDEN.into()));
            }
        }
        let hide = |keys: &mut Vec<super::model::DomainKey>| {
            for k in keys {
                if !k.key_pem.is_empty() {
                    k.key_pem = HIDDEN.into();
                }
            }
        };
        hide(&mut p.domain_keys);
        for v in p.vmtas.values_mut() {
            hide(&mut v.domain_keys);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_and_nothing_else() {
        let h = hash_password("s3cret");
        check_hash(&h).unwrap();
        assert!(verify(&h, "s3cret"));
        assert!(!verify(&h, "s3cret "));
        assert!(!verify(&h, ""));
        assert!(!verify("not a hash", "s3cret"));
        assert!(check_hash("$2b$12$abcdefghijklmnopqrstuv").is_err());
    }

    #[test]
    fn same_bytes_compares_whole_strings() {
        assert!(same_bytes(b"abc", b"abc"));
        assert!(!same_bytes(b"abc", b"abd"));
        assert!(!same_bytes(b"abc", b"abcd"));
        assert!(!same_bytes(b"", b"a"));
    }
}
