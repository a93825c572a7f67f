// SPDX-License-Identifier: Apache-2.0
//! A small least-recently-used cache of metadata tables keyed by host offset.

use std::collections::HashMap;

struct Slot<T> {
    value: T,
    dirty: bool,
    used: u64,
}

/// Holds at most `capacity` tables; the caller writes back dirty ones it evicts.
pub struct TableCache<T> {
    slots: HashMap<u64, Slot<T>>,
    capacity: usize,
    clock: u64,
}

impl<T> TableCache<T> {
    /// A cache of `capacity` tables (at least one).
    pub fn new(capacity: usize) -> Self {
        TableCache {
            slots: HashMap::new(),
            capacity: capacity.max(1),
            clock: 0,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Whether `key` is cached.
    pub fn contains(&self, key: u64) -> bool {
        self.slots.contains_key(&key)
    }

    /// The table at `key`, marking it recently used.
    pub fn get(&mut self, key: u64) -> Option<&T> {
        let now = self.tick();
        self.slots.get_mut(&key).map(|s| {
            s.used = now;
            &s.value
        })
    }

    /// The table at `key` for modification; it becomes dirty.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut T> {
        let now = self.tick();
        self.slots.get_mut(&key).map(|s| {
            s.used = now;
            s.dirty = true;
            &mut s.value
        })
    }

    /// The key `insert` would evict next, with whether that table is dirty.
    pub fn victim(&self) -> Option<(u64, bool)> {
        if self.slots.len() < self.capacity {
            return None;
        }
        self.slots
            .iter()
            .min_by_key(|(_, s)| s.used)
            .map(|(k, s)| (*k, s.dirty))
    }

    /// Inserts a table, evicting the least recently used one if full.
    /// Returns the evicted table when it was dirty.
    pub fn insert(&mut self, key: u64, value: T, dirty: bool) -> Option<(u64, T)> {
        let mut evicted = None;
        if !self.slots.contains_key(&key) {
            if let Some((victim, _)) = self.victim() {
                if let Some(slot) = self.slots.remove(&victim) {
                    if slot.dirty {
                        evicted = Some((victim, slot.value));
                    }
                }
            }
        }
        let used = self.tick();
        self.slots.insert(key, Slot { value, dirty, used });
        evicted
    }

    /// Keys of dirty tables, in offset order.
    pub fn dirty_keys(&self) -> Vec<u64> {
        let mut keys: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        keys
    }

    /// The table at `key` without touching its recency (for write-back).
    pub fn peek(&self, key: u64) -> Option<&T> {
        self.slots.get(&key).map(|s| &s.value)
    }

    /// Marks the table at `key` clean after it was written back.
    pub fn mark_clean(&mut self, key: u64) {
        if let Some(s) = self.slots.get_mut(&key) {
            s.dirty = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cache_insert_over_capacity_evicts_least_recent() {
        let mut c = TableCache::new(2);
        c.insert(1, "a", false);
        c.insert(2, "b", false);
        c.get(1);
        c.insert(3, "c", false);
        assert!(c.contains(1));
        assert!(!c.contains(2));
    }

    #[test]
    fn test_cache_evicting_dirty_returns_it() {
        let mut c = TableCache::new(1);
        c.insert(1, "a", true);
        assert_eq!(c.insert(2, "b", false), Some((1, "a")));
    }

    #[test]
    fn test_cache_get_mut_marks_dirty() {
        let mut c = TableCache::new(4);
        c.insert(8, 0u32, false);
        *c.get_mut(8).unwrap() = 5;
        assert_eq!(c.dirty_keys(), vec![8]);
        c.mark_clean(8);
        assert!(c.dirty_keys().is_empty());
    }
}
