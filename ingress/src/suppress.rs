//! The suppression list as this node checks it at RCPT: the entries for every sender (scoped
//! ones are checked by the leader at enqueue, where the VMTA and job are known), each held as
//! a 64-bit hash of the address with its expiry and reason, so a million entries take about
//! 32 MB and a check is one hash and one probe. The node loads the whole list from a
//! controller, then follows its changes by sequence number.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sluice_common::policy::BOUNCE_CATEGORIES;
use sluice_proto::LeaderClient;
use sluice_proto::queue::queue_client::QueueClient;
use sluice_proto::queue::{SuppressionsReply, SuppressionsRequest};

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reasons that are not bounce categories; an entry keeps its reason as an index into these,
/// then `BOUNCE_CATEGORIES`. Any other reason shows as `other`.
const OWN_REASONS: &[&str] = &["operator", "complaint"];

fn reason_name(i: u8) -> &'static str {
    let i = i as usize;
    OWN_REASONS
        .get(i)
        .or_else(|| BOUNCE_CATEGORIES.get(i.checked_sub(OWN_REASONS.len())?))
        .copied()
        .unwrap_or("other")
}

fn reason_index(reason: &str) -> u8 {
    OWN_REASONS
        .iter()
        .chain(BOUNCE_CATEGORIES)
        .position(|x| *x == reason)
        .or_else(|| {
            BOUNCE_CATEGORIES
                .iter()
                .position(|x| *x == "other")
                .map(|i| i + OWN_REASONS.len())
        })
        .unwrap_or(0) as u8
}

/// The keys are already hashes: the map uses them as they are.
#[derive(Default)]
pub struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | b as u64;
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Address hash -> (expiry in seconds since the epoch, 0 for never; reason index).
type Map = HashMap<u64, (u32, u8), BuildHasherDefault<PassThrough>>;

/// A lower-cased address's hash (std's SipHash with fixed keys: the same in every process
/// built from the same source).
pub fn key(address: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    let mut buf = [0u8; 64];
    for chunk in address.as_bytes().chunks(buf.len()) {
        let lower = &mut buf[..chunk.len()];
        lower.copy_from_slice(chunk);
        lower.make_ascii_lowercase();
        h.write(lower);
    }
    h.finish()
}

#[derive(Default)]
pub struct SuppressionSet {
    map: RwLock<Map>,
    /// The last change applied, and whether the whole list was loaded.
    seq: RwLock<(u64, bool)>,
}

impl SuppressionSet {
    /// The reason `address` (or its whole domain) is suppressed for every sender, unless the
    /// entry expired by `now_ms`.
    pub fn check(&self, address: &str, now_ms: u64) -> Option<&'static str> {
        let map = self.map.read().unwrap();
        let now = (now_ms / 1000) as u32;
        let hit = |k: u64| {
            map.get(&k)
                .filter(|(exp, _)| *exp == 0 || *exp > now)
                .map(|(_, r)| reason_name(*r))
        };
        hit(key(address)).or_else(|| {
            let (_, domain) = address.rsplit_once('@')?;
            let mut d = String::with_capacity(domain.len() + 1);
            d.push('@');
            d.push_str(domain);
            hit(key(&d))
        })
    }

    pub fn len(&self) -> usize {
        self.map.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds an entry (only entries for every sender are kept here).
    pub fn insert(&self, address: &str, scope: &str, reason: &str, expires_ms: u64) {
        if scope.is_empty() {
            insert(&mut self.map.write().unwrap(), address, reason, expires_ms);
        }
    }

    fn apply(&self, reply: SuppressionsReply) {
        let mut map = self.map.write().unwrap();
        for c in reply.changes {
            let Some(e) = c.entry else { continue };
            if !e.scope.is_empty() {
                continue;
            }
            if c.removed {
                map.remove(&key(&e.address));
            } else {
                insert(&mut map, &e.address, &e.reason, e.expires_ms);
            }
        }
    }
}

fn insert(map: &mut Map, address: &str, reason: &str, expires_ms: u64) {
    let r = reason_index(reason);
    // Rounded up to the second: an entry never ends early.
    let exp = expires_ms.div_ceil(1000).min(u32::MAX as u64) as u32;
    map.insert(key(address), (exp, r));
}

async fn call(
    leader: &LeaderClient,
    req: SuppressionsRequest,
) -> Result<SuppressionsReply, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    leader
        .call(deadline, |ch| {
            let r = req.clone();
            async move {
                QueueClient::new(ch)
                    .max_decoding_message_size(64 << 20)
                    .suppressions(tonic::Request::new(r))
                    .await
            }
        })
        .await
        .map_err(|s| s.message().to_string())
}

/// Loads the whole list, then follows its changes every second; loads it again when it fell
/// too far behind.
pub async fn follow(set: Arc<SuppressionSet>, controllers: Vec<String>) {
    let leader = LeaderClient::new(controllers);
    loop {
        // A full load builds a new map and swaps it in, so checks never see half a list.
        let mut fresh = SuppressionSet::default();
        let mut start: Vec<u8> = Vec::new();
        let mut seq = None;
        let loaded = loop {
            match call(
                &leader,
                SuppressionsRequest {
                    after: 0,
                    full: true,
                    start_key: start.clone().into(),
                },
            )
            .await
            {
                Ok(r) => {
                    let first = *seq.get_or_insert(r.seq);
                    let next = r.next_key.to_vec();
                    fresh.apply(r);
                    if next.is_empty() {
                        break Some(first);
                    }
                    start = next;
                }
                Err(e) => {
                    tracing::warn!("loading the suppression list: {e}");
                    break None;
                }
            }
        };
        let Some(mut after) = loaded else {
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        };
        *set.map.write().unwrap() = std::mem::take(fresh.map.get_mut().unwrap());
        *set.seq.write().unwrap() = (after, true);
        tracing::info!(entries = set.len(), "suppression list loaded");
        // Changes made while the pages were read come again here; applying them twice is
        // harmless (an add replaces, a remove of nothing is nothing).
        loop {
            match call(
                &leader,
                SuppressionsRequest {
                    after,
                    full: false,
                    start_key: Default::default(),
                },
            )
            .await
            {
                Ok(r) if r.reload => break,
                Ok(r) => {
                    let more = r.changes.len() >= 50_000;
                    after = r.seq.max(after);
                    set.apply(r);
                    *set.seq.write().unwrap() = (after, true);
                    if more {
                        continue;
                    }
                }
                Err(e) => tracing::warn!("following the suppression list: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_domains_expiry_and_scopes() {
        let s = SuppressionSet::default();
        s.insert("User@Example.com", "", "bad-mailbox", 0);
        s.insert("@blocked.test", "", "operator", 0);
        s.insert("old@x.test", "", "complaint", 1000);
        s.insert("scoped@x.test", "job:j1", "operator", 0);
        assert_eq!(s.check("user@EXAMPLE.com", 50), Some("bad-mailbox"));
        assert_eq!(s.check("anyone@blocked.test", 50), Some("operator"));
        assert_eq!(s.check("old@x.test", 50), Some("complaint"));
        assert_eq!(s.check("old@x.test", 1000), None, "expired");
        assert_eq!(
            s.check("scoped@x.test", 50),
            None,
            "scoped: the leader checks it"
        );
        assert_eq!(s.check("other@example.com", 50), None);
    }
}
