//! The tuples homed on one rank and the requests waiting for them. Pure: no I/O and no blocking. `out`
//! returns the deliveries it made to waiting requests, and the caller sends them or wakes their threads.
//!
//! Tuples are kept in buckets by arity and first field, so a template whose first field is an actual value
//! finds its candidates with one lookup; a template whose first field is formal scans every bucket of its
//! arity (the documented slower path). Waiting requests are served in arrival order: an `out` offers its
//! tuple to the matching waiters oldest first: every reader (`rd`) up to the first taker (`in`) gets a
//! copy, and that taker gets the tuple itself, which then never goes into the store (readers that came
//! after the taker wait on). So a tuple is taken at most
//! once, and waiters on one template are served first come, first served. Several tuples put at once go
//! in together, and then the waiters they concern are served oldest first, each with the oldest match
//! (of its bucket: a formal-first template's candidates come from every bucket of its arity, in no set
//! order): a request waiting on several templates gets the one it prefers among them (`put_quietly`).

use crate::tuple::{Template, Tuple, TupleError, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Identifies a waiting request.
pub type WaiterId = u64;

/// Whether a request takes the tuple (`in`) or reads a copy (`rd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `in`: remove the tuple.
    Take,
    /// `rd`: copy it.
    Read,
}

/// A tuple handed to a waiting request by `out`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The request served.
    pub waiter: WaiterId,
    /// What it gets.
    pub tuple: Tuple,
    /// Whether the tuple left the store for it (a take), or is still there (a read).
    pub taken: bool,
}

#[derive(Debug)]
struct Waiter {
    template: Template,
    mode: Mode,
}

/// Waiting requests by id, which grows with arrival: iteration is arrival order, and a request is
/// withdrawn without a scan (a task farm's idle workers withdraw and wait again every few milliseconds).
type Queue = BTreeMap<WaiterId, Waiter>;

/// Arity and first field (none for the empty tuple).
type Key = (usize, Option<Value>);

fn key_of(t: &Tuple) -> Key {
    (t.arity(), t.0.first().cloned())
}

/// The one bucket whose tuples a template can match: its first field's and arity's, or that of tuples
/// with no field; `None` for a template whose first field is formal (it may match any bucket of its
/// arity).
fn bucket_of(template: &Template) -> Option<Key> {
    template
        .homed_by()
        .map(|(first, arity)| (arity, first.cloned()))
}

/// One rank's share of the tuple space.
#[derive(Debug, Default)]
pub struct TupleStore {
    buckets: HashMap<Key, VecDeque<Tuple>>,
    /// Waiters whose template has an actual first field (or no field), by bucket.
    waiting: HashMap<Key, Queue>,
    /// Waiters whose template's first field is formal: every `out` of their arity looks at them.
    waiting_formal: Queue,
    /// Where each waiter waits: its bucket's key, or `None` for the formal list (so that withdrawing one
    /// looks in its own queue only).
    waiter_keys: HashMap<WaiterId, Option<Key>>,
    next_id: WaiterId,
    tuples: usize,
}

impl TupleStore {
    /// An empty store.
    pub fn new() -> TupleStore {
        TupleStore::default()
    }

    /// Tuples held.
    pub fn len(&self) -> usize {
        self.tuples
    }

    /// Whether no tuple is held.
    pub fn is_empty(&self) -> bool {
        self.tuples == 0
    }

    /// Adds a tuple, or hands it to waiting requests. Returns the deliveries made, oldest waiter first.
    pub fn out(&mut self, tuple: Tuple) -> Result<Vec<Delivery>, TupleError> {
        tuple.check()?;
        let key = key_of(&tuple);
        // Candidates from both waiting lists, in arrival order (ids grow with arrival).
        let mut candidates: Vec<(WaiterId, bool)> = Vec::new();
        if let Some(q) = self.waiting.get(&key) {
            candidates.extend(
                q.iter()
                    .filter(|(_, w)| w.template.matches(&tuple))
                    .map(|(id, _)| (*id, true)),
            );
        }
        candidates.extend(
            self.waiting_formal
                .iter()
                .filter(|(_, w)| w.template.matches(&tuple))
                .map(|(id, _)| (*id, false)),
        );
        candidates.sort_unstable();
        let mut deliveries = Vec::new();
        let mut taken = false;
        for (id, keyed) in candidates {
            let queue = if keyed {
                self.waiting.get_mut(&key)
            } else {
                Some(&mut self.waiting_formal)
            };
            let Some(waiter) = queue.and_then(|q| q.remove(&id)) else {
                continue;
            };
            self.waiter_keys.remove(&id);
            let take = waiter.mode == Mode::Take;
            deliveries.push(Delivery {
                waiter: id,
                tuple: tuple.clone(),
                taken: take,
            });
            if take {
                taken = true;
                break;
            }
        }
        if self.waiting.get(&key).is_some_and(|q| q.is_empty()) {
            self.waiting.remove(&key);
        }
        if !taken {
            self.buckets.entry(key).or_default().push_back(tuple);
            self.tuples += 1;
        }
        Ok(deliveries)
    }

    /// Adds several tuples at once without offering them to anyone, and returns the waiting requests that
    /// at least one of them matches, oldest first, for the caller to [`serve`](TupleStore::serve) in that
    /// order. A request waiting on several templates at once (one waiter per template, registered in order
    /// of preference) is then served by the template it prefers among those the batch matches, not by
    /// whichever tuple of the batch happens to come first. Nothing is added if any tuple is invalid.
    pub fn put_quietly(&mut self, tuples: Vec<Tuple>) -> Result<Vec<WaiterId>, TupleError> {
        for t in &tuples {
            t.check()?;
        }
        let mut waiting = BTreeSet::new();
        for tuple in tuples {
            let key = key_of(&tuple);
            let queues = self.waiting.get(&key).into_iter();
            waiting.extend(
                queues
                    .chain([&self.waiting_formal])
                    .flatten()
                    .filter(|(_, w)| w.template.matches(&tuple))
                    .map(|(id, _)| *id),
            );
            self.buckets.entry(key).or_default().push_back(tuple);
            self.tuples += 1;
        }
        Ok(waiting.into_iter().collect())
    }

    /// Serves waiting request `id` with the oldest tuple held that its template matches (a copy for a
    /// reader; for a formal-first template, the oldest of some bucket, as [`TupleStore::find`]), if there is
    /// one; it then waits no more. `None` when nothing matches or it waits no more.
    pub fn serve(&mut self, id: WaiterId) -> Option<Delivery> {
        let key = self.waiter_keys.get(&id)?.clone();
        let queue = match &key {
            Some(key) => self.waiting.get(key)?,
            None => &self.waiting_formal,
        };
        let waiter = queue.get(&id)?;
        let (template, mode) = (waiter.template.clone(), waiter.mode);
        // Its template was checked when it began to wait.
        let tuple = self.find(&template, mode).ok().flatten()?;
        self.cancel(id);
        Some(Delivery {
            waiter: id,
            tuple,
            taken: mode == Mode::Take,
        })
    }

    /// Finds (oldest first within a bucket; the buckets of a formal-first template's arity in no set order)
    /// and, for `Mode::Take`, removes a tuple matching `template`.
    pub fn find(&mut self, template: &Template, mode: Mode) -> Result<Option<Tuple>, TupleError> {
        template.check()?;
        let arity = template.arity();
        let keys: Vec<Key> = match bucket_of(template) {
            Some(key) => vec![key],
            None => self
                .buckets
                .keys()
                .filter(|k| k.0 == arity)
                .cloned()
                .collect(),
        };
        for key in keys {
            let Some(bucket) = self.buckets.get_mut(&key) else {
                continue;
            };
            let Some(pos) = bucket.iter().position(|t| template.matches(t)) else {
                continue;
            };
            if mode == Mode::Read {
                return Ok(Some(bucket[pos].clone()));
            }
            let t = bucket.remove(pos).expect("position is in range");
            if bucket.is_empty() {
                self.buckets.remove(&key);
            }
            self.tuples -= 1;
            return Ok(Some(t));
        }
        Ok(None)
    }

    /// `find`, or else registers a waiting request served by a later `out`.
    pub fn find_or_wait(
        &mut self,
        template: Template,
        mode: Mode,
    ) -> Result<Result<Tuple, WaiterId>, TupleError> {
        if let Some(t) = self.find(&template, mode)? {
            return Ok(Ok(t));
        }
        self.wait(template, mode).map(Err)
    }

    /// Registers a waiting request without looking for a match first (the caller just did, under the
    /// same borrow), to be served by a later `out`.
    pub fn wait(&mut self, template: Template, mode: Mode) -> Result<WaiterId, TupleError> {
        template.check()?;
        let id = self.next_id;
        self.next_id += 1;
        let key = bucket_of(&template);
        let waiter = Waiter { template, mode };
        match &key {
            Some(key) => self
                .waiting
                .entry(key.clone())
                .or_default()
                .insert(id, waiter),
            None => self.waiting_formal.insert(id, waiter),
        };
        self.waiter_keys.insert(id, key);
        Ok(id)
    }

    /// Withdraws a waiting request (a timeout). Returns false when it is no longer waiting: it was served,
    /// and its delivery must be honoured. A queue left empty goes (templates with first fields used once
    /// each, such as per-request reply keys, would otherwise pile up).
    pub fn cancel(&mut self, id: WaiterId) -> bool {
        let Some(key) = self.waiter_keys.remove(&id) else {
            return false;
        };
        let queue = match &key {
            Some(key) => self.waiting.get_mut(key),
            None => Some(&mut self.waiting_formal),
        };
        if queue.and_then(|q| q.remove(&id)).is_none() {
            return false;
        }
        if let Some(key) = key.filter(|k| self.waiting.get(k).is_some_and(|q| q.is_empty())) {
            self.waiting.remove(&key);
        }
        true
    }

    /// The number of tuples matching `template`: in its one bucket when its first field is given, else
    /// in every bucket of its arity.
    pub fn count(&self, template: &Template) -> usize {
        let matching = |b: &VecDeque<Tuple>| b.iter().filter(|t| template.matches(t)).count();
        match bucket_of(template) {
            Some(key) => self.buckets.get(&key).map_or(0, matching),
            None => self
                .buckets
                .iter()
                .filter(|(k, _)| k.0 == template.arity())
                .map(|(_, b)| matching(b))
                .sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{template, tuple};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn waiters_on_a_template_are_served_in_arrival_order() {
        let mut s = TupleStore::new();
        let ids: Vec<WaiterId> = (0..3)
            .map(|_| {
                s.find_or_wait(template!("job", ?i64), Mode::Take)
                    .unwrap()
                    .unwrap_err()
            })
            .collect();
        for n in 0..3 {
            let d = s.out(tuple!("job", n)).unwrap();
            assert_eq!(
                d,
                vec![Delivery {
                    waiter: ids[n as usize],
                    tuple: tuple!("job", n),
                    taken: true,
                }]
            );
        }
        assert!(s.is_empty(), "every tuple went to a waiter");
    }

    #[test]
    fn a_batch_serves_each_waiter_the_template_it_registered_first() {
        // One request waiting on two templates, preferring "mine" (registered first), as a task farm's
        // worker does; the batch brings the other kind first.
        let mut s = TupleStore::new();
        let mine = s.wait(template!("mine", ?i64), Mode::Take).unwrap();
        let theirs = s.wait(template!("theirs", ?i64), Mode::Take).unwrap();
        let later = s.wait(template!("theirs", ?i64), Mode::Take).unwrap();
        let concerned = s
            .put_quietly(vec![
                tuple!("theirs", 1),
                tuple!("theirs", 2),
                tuple!("mine", 3),
            ])
            .unwrap();
        assert_eq!(concerned, vec![mine, theirs, later]);
        assert_eq!(
            s.serve(mine),
            Some(Delivery {
                waiter: mine,
                tuple: tuple!("mine", 3),
                taken: true,
            })
        );
        // The request is served: its other template stops waiting (the tuple space withdraws it).
        assert!(s.cancel(theirs));
        assert_eq!(s.serve(theirs), None);
        assert_eq!(s.serve(later).map(|d| d.tuple), Some(tuple!("theirs", 1)));
        assert_eq!(s.len(), 1, "the second of theirs stays");
        // An invalid tuple in a batch: nothing goes in.
        let too_big = Tuple(
            (0..crate::tuple::MAX_FIELDS + 1)
                .map(|_| Value::Bool(true))
                .collect(),
        );
        assert!(s.put_quietly(vec![tuple!("mine", 4), too_big]).is_err());
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn withdrawn_waiters_leave_nothing_behind() {
        let mut s = TupleStore::new();
        // Reply keys used once each, all timing out: nothing of them stays.
        for i in 0..10_000i64 {
            let id = s.wait(template!(i, ?i64), Mode::Take).unwrap();
            assert!(s.cancel(id));
            assert!(!s.cancel(id), "withdrawn once");
        }
        let formal = s.wait(template!(?i64, ?i64), Mode::Read).unwrap();
        assert!(s.cancel(formal));
        assert!(s.waiting.is_empty() && s.waiting_formal.is_empty());
        assert!(s.waiter_keys.is_empty());
        // A served waiter is forgotten too.
        let id = s.wait(template!("k", ?i64), Mode::Take).unwrap();
        assert_eq!(s.out(tuple!("k", 1)).unwrap().len(), 1);
        assert!(!s.cancel(id));
        assert!(s.waiting.is_empty() && s.waiter_keys.is_empty());
    }

    #[test]
    fn readers_get_copies_and_the_first_taker_gets_the_tuple() {
        let mut s = TupleStore::new();
        let r1 = s
            .find_or_wait(template!("x", ?i64), Mode::Read)
            .unwrap()
            .unwrap_err();
        let t1 = s
            .find_or_wait(template!(?String, 5), Mode::Take)
            .unwrap()
            .unwrap_err();
        let t2 = s
            .find_or_wait(template!("x", ?i64), Mode::Take)
            .unwrap()
            .unwrap_err();
        let d = s.out(tuple!("x", 5)).unwrap();
        let served: Vec<WaiterId> = d.iter().map(|d| d.waiter).collect();
        assert_eq!(
            served,
            vec![r1, t1],
            "the reader, then the oldest taker (a formal-first template)"
        );
        assert!(s.is_empty());
        assert!(s.cancel(t2), "the later taker still waits");
        assert!(!s.cancel(t1), "a served request cannot be withdrawn");
    }

    #[test]
    fn find_count_and_formal_first_templates() {
        let mut s = TupleStore::new();
        for i in 0..5 {
            s.out(tuple!("a", i)).unwrap();
            s.out(tuple!("b", i)).unwrap();
        }
        s.out(tuple!()).unwrap();
        assert_eq!(s.count(&template!("a", ?i64)), 5);
        assert_eq!(s.count(&template!(?String, 3)), 2);
        assert_eq!(s.count(&template!()), 1);
        assert_eq!(
            s.find(&template!("a", 3), Mode::Read).unwrap(),
            Some(tuple!("a", 3))
        );
        assert_eq!(
            s.find(&template!(?String, 4), Mode::Take)
                .unwrap()
                .map(|t| t.get::<i64>(1).unwrap()),
            Some(4)
        );
        assert_eq!(s.len(), 10);
        assert_eq!(s.find(&template!("c", ?i64), Mode::Take).unwrap(), None);
        assert!(s
            .out(crate::tuple::Tuple(
                (0..20).map(crate::tuple::Value::from).collect()
            ))
            .is_err());
    }

    /// Random outs, takes, reads, waits and cancels against a model multiset: a take returns only a
    /// matching tuple that is there, every tuple is delivered or kept exactly once, nothing appears twice.
    #[test]
    fn nothing_is_lost_or_duplicated() {
        for seed in 0..200u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut s = TupleStore::new();
            let mut model: Vec<Tuple> = Vec::new();
            let mut waiting: Vec<(WaiterId, Template, Mode)> = Vec::new();
            let mut taken_by_waiters = 0usize;
            let mut outs = 0usize;
            let mut takes = 0usize;
            let names = ["a", "b"];
            let random_template = |rng: &mut StdRng| match rng.random_range(0..4) {
                0 => template!(names[rng.random_range(0..2)], ?i64),
                1 => template!(?String, rng.random_range(0..3i64)),
                2 => template!(names[rng.random_range(0..2)], rng.random_range(0..3i64)),
                _ => template!(?String, ?i64),
            };
            for _ in 0..400 {
                match rng.random_range(0..6) {
                    0 | 1 => {
                        let t = tuple!(names[rng.random_range(0..2)], rng.random_range(0..3i64));
                        outs += 1;
                        let deliveries = s.out(t.clone()).unwrap();
                        let mut kept = true;
                        for d in deliveries {
                            assert_eq!(d.tuple, t);
                            let i = waiting
                                .iter()
                                .position(|w| w.0 == d.waiter)
                                .expect("a known waiter");
                            let (_, tpl, mode) = waiting.remove(i);
                            assert!(tpl.matches(&t));
                            if mode == Mode::Take {
                                kept = false;
                                taken_by_waiters += 1;
                            }
                        }
                        if kept {
                            model.push(t);
                        }
                    }
                    2 => {
                        let tpl = random_template(&mut rng);
                        let mode = if rng.random_bool(0.7) {
                            Mode::Take
                        } else {
                            Mode::Read
                        };
                        match s.find_or_wait(tpl.clone(), mode).unwrap() {
                            Ok(t) => {
                                assert!(tpl.matches(&t));
                                let i = model
                                    .iter()
                                    .position(|m| *m == t)
                                    .expect("the tuple was in the store");
                                if mode == Mode::Take {
                                    model.remove(i);
                                    takes += 1;
                                }
                            }
                            Err(id) => {
                                assert!(
                                    !model.iter().any(|m| tpl.matches(m)),
                                    "waited although a match was there"
                                );
                                waiting.push((id, tpl, mode));
                            }
                        }
                    }
                    5 => {
                        // A batch: every tuple goes in, then the waiters it concerns are served oldest
                        // first, each with the oldest match held.
                        let batch: Vec<Tuple> = (0..rng.random_range(2..6))
                            .map(|_| {
                                tuple!(names[rng.random_range(0..2)], rng.random_range(0..3i64))
                            })
                            .collect();
                        outs += batch.len();
                        model.extend(batch.iter().cloned());
                        let concerned = s.put_quietly(batch).unwrap();
                        assert!(concerned.windows(2).all(|w| w[0] < w[1]), "oldest first");
                        for id in concerned {
                            let Some(d) = s.serve(id) else { continue };
                            assert_eq!(d.waiter, id);
                            let i = waiting
                                .iter()
                                .position(|w| w.0 == id)
                                .expect("a known waiter");
                            let (_, tpl, mode) = waiting.remove(i);
                            assert!(tpl.matches(&d.tuple));
                            let m = model
                                .iter()
                                .position(|m| *m == d.tuple)
                                .expect("the tuple was in the store");
                            if mode == Mode::Take {
                                model.remove(m);
                                taken_by_waiters += 1;
                            }
                        }
                        assert!(
                            !waiting
                                .iter()
                                .any(|(_, tpl, _)| model.iter().any(|m| tpl.matches(m))),
                            "a request still waits although a match is held"
                        );
                    }
                    3 => {
                        let tpl = random_template(&mut rng);
                        assert_eq!(
                            s.count(&tpl),
                            model.iter().filter(|m| tpl.matches(m)).count()
                        );
                    }
                    _ => {
                        if !waiting.is_empty() {
                            let i = rng.random_range(0..waiting.len());
                            assert!(s.cancel(waiting[i].0));
                            waiting.remove(i);
                        }
                    }
                }
                assert_eq!(s.len(), model.len());
            }
            // Drain: exactly the model's tuples are left.
            let mut left = Vec::new();
            while let Some(t) = s.find(&template!(?String, ?i64), Mode::Take).unwrap() {
                left.push(t);
            }
            left.sort_by_key(|t| format!("{t:?}"));
            model.sort_by_key(|t| format!("{t:?}"));
            assert_eq!(left, model, "seed {seed}");
            assert_eq!(
                outs,
                left.len() + takes + taken_by_waiters,
                "every out is kept or taken exactly once"
            );
        }
    }
}
