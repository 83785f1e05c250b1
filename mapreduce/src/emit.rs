//! Map output as it is emitted: pairs folded by the combiner into a hash table (or kept as a list when the
//! job has none), with an estimate of the memory they take; past the budget they are handed to the spill,
//! which writes them to disk as sorted runs. And user counters, summed over every task of the job.

use crate::Combiner;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::hash::Hash;

/// Named counters a job's functions add to; the job's report sums them over all tasks (a task done twice,
/// after a failure, counts once).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters(BTreeMap<String, u64>);

impl Counters {
    /// Adds `n` to the counter `name` (a sum past `u64::MAX` stays there).
    pub fn add(&mut self, name: &str, n: u64) {
        match self.0.get_mut(name) {
            Some(c) => *c = c.saturating_add(n),
            None => {
                self.0.insert(name.to_string(), n);
            }
        }
    }

    /// The value of counter `name` (0 if never added to).
    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    /// Every counter, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    pub(crate) fn merge(&mut self, other: &Counters) {
        for (k, v) in other.iter() {
            self.add(k, v);
        }
    }
}

/// Where `map` emits its pairs.
pub struct Emitter<'a, K, V> {
    combiner: Option<Combiner<V>>,
    table: FxHashMap<K, V>,
    pairs: Vec<(K, V)>,
    bytes: u64,
    budget: u64,
    spill: &'a mut dyn FnMut(Vec<(K, V)>) -> Result<(), String>,
    error: Option<String>,
    pub(crate) counters: Counters,
}

impl<K, V> std::fmt::Debug for Emitter<'_, K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emitter")
            .field("held", &(self.table.len() + self.pairs.len()))
            .field("bytes", &self.bytes)
            .field("budget", &self.budget)
            .finish()
    }
}

/// The memory one held entry takes beyond its encoded size: the pair itself and the table's overhead.
fn overhead<K, V>() -> u64 {
    (std::mem::size_of::<(K, V)>() + 16) as u64
}

fn encoded_size<T: Serialize + ?Sized>(value: &T) -> u64 {
    postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default()).unwrap_or(0)
        as u64
}

impl<'a, K, V> Emitter<'a, K, V>
where
    K: Hash + Eq + Serialize,
    V: Serialize,
{
    #[cfg(test)]
    pub(crate) fn new(
        combiner: Option<Combiner<V>>,
        budget: u64,
        spill: &'a mut dyn FnMut(Vec<(K, V)>) -> Result<(), String>,
    ) -> Emitter<'a, K, V> {
        Emitter::with_table(combiner, budget, spill, FxHashMap::default())
    }

    /// An emitter that folds into `table` (empty; its allocation is reused).
    pub(crate) fn with_table(
        combiner: Option<Combiner<V>>,
        budget: u64,
        spill: &'a mut dyn FnMut(Vec<(K, V)>) -> Result<(), String>,
        table: FxHashMap<K, V>,
    ) -> Emitter<'a, K, V> {
        debug_assert!(table.is_empty());
        Emitter {
            combiner,
            table,
            pairs: Vec::new(),
            bytes: 0,
            budget,
            spill,
            error: None,
            counters: Counters::default(),
        }
    }

    /// Emits `(key, value)`.
    pub fn emit(&mut self, key: K, value: V) {
        match self.combiner {
            Some(combine) => match self.table.get_mut(&key) {
                Some(total) => combine(total, value),
                None => {
                    self.bytes += overhead::<K, V>() + encoded_size(&key) + encoded_size(&value);
                    self.table.insert(key, value);
                }
            },
            None => {
                self.bytes += overhead::<K, V>() + encoded_size(&key) + encoded_size(&value);
                self.pairs.push((key, value));
            }
        }
        self.spill_if_over();
    }

    /// Emits `(key, value)` from a borrowed key, which is copied only when the table does not hold it yet
    /// (a word already counted costs no allocation).
    pub fn emit_ref<Q>(&mut self, key: &Q, value: V)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(combine) = self.combiner {
            if let Some(total) = self.table.get_mut(key) {
                combine(total, value);
                return;
            }
        }
        self.emit(key.to_owned(), value);
    }

    /// Adds `n` to the counter `name`.
    pub fn count(&mut self, name: &str, n: u64) {
        self.counters.add(name, n);
    }

    fn spill_if_over(&mut self) {
        if self.bytes > self.budget && self.error.is_none() {
            let held = self.take();
            if let Err(e) = (self.spill)(held) {
                self.error = Some(e);
            }
        }
    }

    /// Everything held, unsorted, leaving the emitter empty.
    pub(crate) fn take(&mut self) -> Vec<(K, V)> {
        self.bytes = 0;
        if self.combiner.is_some() {
            self.table.drain().collect()
        } else {
            std::mem::take(&mut self.pairs)
        }
    }

    /// The table, emptied, for the next emitter to reuse its allocation.
    pub(crate) fn into_table(mut self) -> FxHashMap<K, V> {
        self.table.clear();
        self.table
    }

    /// The first spill error, if any.
    pub(crate) fn error(&mut self) -> Option<String> {
        self.error.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sorts `pairs` by key and, with a combiner, folds pairs of equal keys into one.
    fn sort_and_combine<K: Ord, V>(
        mut pairs: Vec<(K, V)>,
        combiner: Option<Combiner<V>>,
    ) -> Vec<(K, V)> {
        // Unstable: keys are unique after combining, and a key's values reach reduce in no particular order.
        pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let Some(combine) = combiner else {
            return pairs;
        };
        let mut out: Vec<(K, V)> = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            match out.last_mut() {
                Some((last, total)) if *last == k => combine(total, v),
                _ => out.push((k, v)),
            }
        }
        out
    }

    fn add(total: &mut u64, n: u64) {
        *total += n;
    }

    /// Emits `keys` (each with count 1) through an emitter of `budget` bytes; returns the spills and
    /// what was still held at the end.
    type Held = Vec<(String, u64)>;

    fn emit_all(keys: &[String], budget: u64) -> (Vec<Held>, Held) {
        let mut spilled = Vec::new();
        let mut spill = |held: Vec<(String, u64)>| {
            spilled.push(held);
            Ok(())
        };
        let mut e = Emitter::new(Some(add as Combiner<u64>), budget, &mut spill);
        for k in keys {
            e.emit_ref(k.as_str(), 1);
        }
        let rest = e.take();
        (spilled, rest)
    }

    #[test]
    fn the_combiner_folds_and_the_budget_spills() {
        let few: Vec<String> = (0..1000).map(|i| format!("w{}", i % 10)).collect();
        let (spilled, held) = emit_all(&few, 2000);
        assert!(spilled.is_empty(), "10 keys fit in 2000 bytes");
        let counts = sort_and_combine(held, Some(add));
        assert_eq!(counts.len(), 10);
        assert!(counts.iter().all(|(_, n)| *n == 100));

        let many: Vec<String> = (0..1000).map(|i| format!("w{i}")).collect();
        let (spilled, rest) = emit_all(&many, 2000);
        assert!(spilled.len() > 1, "1000 keys do not fit in 2000 bytes");
        let all: Vec<_> = spilled.into_iter().flatten().chain(rest).collect();
        let counts = sort_and_combine(all, Some(add));
        assert_eq!(counts.len(), 1000);
        assert!(counts.iter().all(|(_, n)| *n == 1));
    }

    #[test]
    fn without_a_combiner_every_pair_is_kept_sorted() {
        let mut spill = |_: Vec<(u32, u32)>| Err("no spill expected".to_string());
        let mut e = Emitter::new(None, 1 << 20, &mut spill);
        for i in [3u32, 1, 2, 1] {
            e.emit(i, i * 10);
        }
        let pairs = e.take();
        assert_eq!(
            sort_and_combine(pairs, None),
            vec![(1, 10), (1, 10), (2, 20), (3, 30)]
        );
    }
}
