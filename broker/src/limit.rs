//! Concurrency per key (a source address, a guest): at most N at once, released on drop.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// At most `max` holders per key at once.
#[derive(Debug)]
pub struct KeyLimiter<K: Hash + Eq + Clone> {
    max: usize,
    open: Mutex<HashMap<K, usize>>,
}

/// One holder's place; released when dropped.
#[derive(Debug)]
pub struct KeyGuard<K: Hash + Eq + Clone> {
    limiter: Arc<KeyLimiter<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Drop for KeyGuard<K> {
    fn drop(&mut self) {
        if let Ok(mut open) = self.limiter.open.lock()
            && let Some(n) = open.get_mut(&self.key)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl<K: Hash + Eq + Clone> KeyLimiter<K> {
    /// At most `max` per key.
    pub fn new(max: usize) -> Arc<KeyLimiter<K>> {
        Arc::new(KeyLimiter {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for `key`, or `None` when it has its share.
    pub fn acquire(self: &Arc<Self>, key: K) -> Option<KeyGuard<K>> {
        let mut open = self.open.lock().ok()?;
        let n = open.entry(key.clone()).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(KeyGuard {
            limiter: self.clone(),
            key,
        })
    }
}

/// The key a source is counted under: an IPv4 address, or an IPv6 /64 (one host usually
/// holds a whole /64). IPv4-mapped IPv6 addresses count as IPv4.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                for s in &mut seg[4..] {
                    *s = 0;
                }
                IpAddr::V6(seg.into())
            }
        },
    }
}

/// A peer label (an address, as the front ends record it) as the source it is counted under:
/// [`source_key`] for addresses, the label itself otherwise.
pub fn source_label(peer: &str) -> String {
    match peer.parse::<IpAddr>() {
        Ok(ip) => source_key(ip).to_string(),
        Err(_) => peer.to_string(),
    }
}
