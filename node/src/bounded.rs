//! A map that holds at most a set number of entries: what the writer remembers between writes.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

/// A map of at most `max` entries; inserting a new key into a full map drops an
/// arbitrary other entry first. For memory that only saves reading the store again:
/// a dropped entry is read afresh when next needed.
pub(crate) struct BoundedMap<K, V> {
    map: HashMap<K, V>,
    max: usize,
}

impl<K: Eq + Hash + Clone, V> BoundedMap<K, V> {
    pub(crate) fn new(max: usize) -> Self {
        BoundedMap {
            map: HashMap::new(),
            max,
        }
    }

    pub(crate) fn get<Q: Eq + Hash + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.map.get(key)
    }

    pub(crate) fn remove<Q: Eq + Hash + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.map.remove(key)
    }

    pub(crate) fn insert(&mut self, key: K, value: V) {
        if self.map.len() >= self.max
            && !self.map.contains_key(&key)
            && let Some(other) = self.map.keys().next().cloned()
        {
            self.map.remove(&other);
        }
        self.map.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_map_makes_room_for_a_new_key_but_not_for_a_known_one() {
        let mut m = BoundedMap::new(2);
        m.insert("a", 1);
        m.insert("b", 2);
        m.insert("a", 3);
        assert_eq!((m.get(&"a"), m.get(&"b")), (Some(&3), Some(&2)));
        m.insert("c", 4);
        assert_eq!(m.get(&"c"), Some(&4));
        let kept = [m.get(&"a"), m.get(&"b")]
            .iter()
            .filter(|v| v.is_some())
            .count();
        assert_eq!(kept, 1, "one of the older two made room");
        assert_eq!(m.remove(&"c"), Some(4));
    }
}
