//! Operation records kept in a node's memory: the store of the memory bus (and of
//! any bus without a fleet-wide one). Entries expire after their TTL; the map is
//! swept on every write, so it never holds more than what is still wanted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Records by key, each with its expiry.
#[derive(Default)]
pub struct LocalStore {
    records: Mutex<HashMap<String, (Vec<u8>, Instant)>>,
}

impl LocalStore {
    pub fn store(&self, key: &str, record: Vec<u8>, ttl: Duration) {
        let now = Instant::now();
        let mut records = self.records.lock();
        records.retain(|_, (_, expires)| *expires > now);
        records.insert(key.to_string(), (record, now + ttl));
    }

    pub fn load(&self, key: &str) -> Option<Vec<u8>> {
        let records = self.records.lock();
        records
            .get(key)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(record, _)| record.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_expire() {
        let store = LocalStore::default();
        store.store("a", b"1".to_vec(), Duration::from_secs(60));
        store.store("b", b"2".to_vec(), Duration::ZERO);
        assert_eq!(store.load("a").as_deref(), Some(&b"1"[..]));
        assert_eq!(store.load("b"), None);
    }
}
