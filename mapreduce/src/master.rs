//! The master's bookkeeping, as a pure state machine: which map outputs exist and on which rank, which
//! reduce partitions are done, and what to hand out next. It takes task results (and news of lost ranks)
//! and returns the tasks to put into the bag; the engine does the putting. Map tasks go out first; reduce
//! tasks once every split's output exists somewhere. When a reducer finds a rank gone, every map output on
//! that rank is made again and the partitions still to do go out once it is back.
//!
//! A rank folds the output of all the maps it runs of one *batch* together (a word counted by ten maps is
//! held once, not ten times) and writes it as runs only when a reduce first asks for it. Every map put
//! before the first reduces goes into batch 0; each time reduces go out the batch number moves on, so a
//! map redone after that (its holder lost) never joins a batch a reduce has already been told about. A
//! reduce's sources name each batch with the map tasks it must hold, which the holder checks.
//!
//! Every put gets a fresh task id, so a result is matched to the exact put it answers: a late result of an
//! attempt that was since replaced is ignored, and counters count each map and each partition once.

use crate::emit::Counters;
use crate::input::{FileVersion, Split};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

/// A task in the bag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Task {
    /// Map split number `index` into `partitions` partitions, folding its output into batch `batch` of the
    /// rank that runs it.
    Map {
        index: u32,
        split: Split,
        /// The version of the split's file when the job cut it, when the master knows it.
        version: Option<FileVersion>,
        partitions: u32,
        batch: u64,
    },
    /// Reduce `partition`, whose runs are at `sources`, into a file in `output`. Every reduce put at once
    /// reads the same batches: they share one list, which names every map task.
    Reduce {
        partition: u32,
        sources: Arc<[Source]>,
        output: PathBuf,
    },
}

/// One batch of map output a reduce reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Source {
    /// The rank that holds it.
    pub(crate) holder: u32,
    /// The batch.
    pub(crate) batch: u64,
    /// The map tasks whose output it holds, in increasing order: the holder checks that it holds exactly
    /// these, so that a map folded in twice, or missing, fails the job instead of changing its counts.
    pub(crate) tasks: Vec<u64>,
}

/// What a worker reports for a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum TaskResult {
    /// A map task's output is folded into the task's batch on `holder`.
    Mapped {
        holder: u32,
        input_bytes: u64,
        counters: Counters,
    },
    /// A partition's output file is written, from `runs` runs of map output of `run_bytes` bytes in all,
    /// `shuffled_bytes` of them fetched from other ranks.
    Reduced {
        records: u64,
        runs: u64,
        run_bytes: u64,
        shuffled_bytes: u64,
        counters: Counters,
    },
    /// A reducer could not fetch from `holder`: that rank is gone.
    Lost { holder: u32 },
    /// The task failed for good (the job's code panicked, an input changed, a disk filled).
    Failed { what: String },
}

#[derive(Debug, Clone)]
enum MapState {
    Running(u64),
    Done { holder: u32, task: u64, batch: u64 },
}

/// What the last accepted run of a split reported: kept apart from the split's state, so that a split
/// put again after its holder was lost still counts (once) if the job finishes before the new run does.
#[derive(Debug, Clone)]
struct MapStats {
    input_bytes: u64,
    counters: Counters,
}

#[derive(Debug, Clone)]
enum ReduceState {
    Blocked,
    Running(u64),
    Done {
        records: u64,
        runs: u64,
        run_bytes: u64,
        shuffled_bytes: u64,
        counters: Counters,
    },
}

/// What the engine does after a result.
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    /// Put these tasks (perhaps none) and wait for the next result.
    Put(Vec<(u64, Task)>),
    /// Every partition is written.
    Finished,
    /// The job cannot finish.
    Failed(String),
}

/// The master of one job.
#[derive(Debug)]
pub(crate) struct Master {
    splits: Vec<Split>,
    /// The versions of the splits' files, by split (see [`Master::with_versions`]).
    versions: Vec<Option<FileVersion>>,
    output: PathBuf,
    maps: Vec<MapState>,
    map_stats: Vec<Option<MapStats>>,
    reduces: Vec<ReduceState>,
    next_id: u64,
    /// The batch maps put now fold into.
    batch: u64,
    lost: BTreeSet<u32>,
    /// How many of `maps` and of `reduces` are `Done` (kept as they change: the master looks after every
    /// result, and counting them each time made a job of many partitions quadratic).
    done_maps: usize,
    done_reduces: usize,
    /// Map tasks put again because the rank holding their output was lost.
    pub(crate) redone: usize,
}

/// Totals over the finished tasks.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Totals {
    pub(crate) maps_done: usize,
    pub(crate) reduces_done: usize,
    pub(crate) input_bytes: u64,
    pub(crate) map_output_bytes: u64,
    pub(crate) map_runs: u64,
    pub(crate) shuffled_bytes: u64,
    pub(crate) records: u64,
    pub(crate) counters: Counters,
}

impl Master {
    /// Where the reduces write their part files.
    pub(crate) fn output(&self) -> &std::path::Path {
        &self.output
    }

    pub(crate) fn new(splits: Vec<Split>, partitions: u32, output: PathBuf) -> Master {
        Master {
            versions: vec![None; splits.len()],
            maps: vec![MapState::Running(u64::MAX); splits.len()],
            map_stats: vec![None; splits.len()],
            reduces: vec![ReduceState::Blocked; partitions as usize],
            splits,
            output,
            next_id: 0,
            batch: 0,
            lost: BTreeSet::new(),
            done_maps: 0,
            done_reduces: 0,
            redone: 0,
        }
    }

    /// Gives each split the version of its file when the job cut it (`versions` by split): a map task
    /// fails if the file it reads is no longer that one.
    pub(crate) fn with_versions(mut self, versions: Vec<FileVersion>) -> Master {
        assert_eq!(versions.len(), self.splits.len(), "one version per split");
        self.versions = versions.into_iter().map(Some).collect();
        self
    }

    /// The first tasks: every map (and, when there is no input, every reduce).
    pub(crate) fn start(&mut self) -> Vec<(u64, Task)> {
        let mut put: Vec<_> = (0..self.maps.len()).map(|i| self.put_map(i)).collect();
        put.extend(self.put_reduces_if_ready());
        put
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id - 1
    }

    fn put_map(&mut self, index: usize) -> (u64, Task) {
        let id = self.fresh_id();
        if matches!(self.maps[index], MapState::Done { .. }) {
            self.done_maps -= 1;
        }
        self.maps[index] = MapState::Running(id);
        let task = Task::Map {
            index: index as u32,
            split: self.splits[index].clone(),
            version: self.versions[index],
            partitions: self.reduces.len() as u32,
            batch: self.batch,
        };
        (id, task)
    }

    /// Once every map output exists, the blocked partitions' reduce tasks.
    fn put_reduces_if_ready(&mut self) -> Vec<(u64, Task)> {
        if self.done_maps < self.maps.len() {
            return Vec::new();
        }
        // Every partition reads every batch (a batch with nothing for a partition has no runs of it).
        let mut batches: std::collections::BTreeMap<(u32, u64), Vec<u64>> = Default::default();
        for m in &self.maps {
            if let MapState::Done {
                holder,
                task,
                batch,
            } = m
            {
                batches.entry((*holder, *batch)).or_default().push(*task);
            }
        }
        let sources: Arc<[Source]> = batches
            .into_iter()
            .map(|((holder, batch), mut tasks)| {
                tasks.sort_unstable();
                Source {
                    holder,
                    batch,
                    tasks,
                }
            })
            .collect();
        let mut put = Vec::new();
        for p in 0..self.reduces.len() {
            if !matches!(self.reduces[p], ReduceState::Blocked) {
                continue;
            }
            let sources = Arc::clone(&sources);
            let id = self.fresh_id();
            self.reduces[p] = ReduceState::Running(id);
            put.push((
                id,
                Task::Reduce {
                    partition: p as u32,
                    sources,
                    output: self.output.clone(),
                },
            ));
        }
        if !put.is_empty() {
            // The batches these reduces read are closed: maps from now on go into new ones.
            self.batch += 1;
        }
        put
    }

    /// `rank` is gone: the map outputs it held are made again while a partition is still to be written
    /// (once all are written nothing needs them: making them again would be wasted, and a job could end
    /// before the new maps did).
    pub(crate) fn lose(&mut self, rank: u32) -> Vec<(u64, Task)> {
        if !self.lost.insert(rank) {
            return Vec::new();
        }
        if self.done_reduces == self.reduces.len() {
            return Vec::new();
        }
        let held: Vec<usize> = (0..self.maps.len())
            .filter(|i| matches!(&self.maps[*i], MapState::Done { holder, .. } if *holder == rank))
            .collect();
        self.redone += held.len();
        held.into_iter().map(|i| self.put_map(i)).collect()
    }

    /// The result of task `id`, which was `task`.
    pub(crate) fn on_result(&mut self, id: u64, task: &Task, result: TaskResult) -> Step {
        if let TaskResult::Failed { what } = result {
            return Step::Failed(what);
        }
        match (task, result) {
            (
                Task::Map { index, batch, .. },
                TaskResult::Mapped {
                    holder,
                    input_bytes,
                    counters,
                },
            ) => {
                let i = *index as usize;
                if !matches!(self.maps.get(i), Some(MapState::Running(r)) if *r == id) {
                    return Step::Put(Vec::new());
                }
                if self.lost.contains(&holder) {
                    // Its output is already gone with its rank.
                    self.redone += 1;
                    return Step::Put(vec![self.put_map(i)]);
                }
                self.done_maps += 1;
                self.map_stats[i] = Some(MapStats {
                    input_bytes,
                    counters,
                });
                self.maps[i] = MapState::Done {
                    holder,
                    task: id,
                    batch: *batch,
                };
                Step::Put(self.put_reduces_if_ready())
            }
            (
                Task::Reduce { partition, .. },
                TaskResult::Reduced {
                    records,
                    runs,
                    run_bytes,
                    shuffled_bytes,
                    counters,
                },
            ) => {
                let p = *partition as usize;
                if matches!(self.reduces.get(p), Some(ReduceState::Running(r)) if *r == id) {
                    self.reduces[p] = ReduceState::Done {
                        records,
                        runs,
                        run_bytes,
                        shuffled_bytes,
                        counters,
                    };
                    self.done_reduces += 1;
                }
                if self.done_reduces == self.reduces.len() {
                    Step::Finished
                } else {
                    Step::Put(Vec::new())
                }
            }
            (Task::Reduce { partition, .. }, TaskResult::Lost { holder }) => {
                let p = *partition as usize;
                if matches!(self.reduces.get(p), Some(ReduceState::Running(r)) if *r == id) {
                    self.reduces[p] = ReduceState::Blocked;
                }
                let mut put = self.lose(holder);
                put.extend(self.put_reduces_if_ready());
                Step::Put(put)
            }
            (task, result) => Step::Failed(format!(
                "task {id} ({}) answered with {result:?}",
                match task {
                    Task::Map { .. } => "a map",
                    Task::Reduce { .. } => "a reduce",
                }
            )),
        }
    }

    /// Totals over the tasks finished so far (each map and each partition once), as the workers reported
    /// them (saturating: a report is a peer's word).
    pub(crate) fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for m in self.map_stats.iter().flatten() {
            t.maps_done += 1;
            t.input_bytes = t.input_bytes.saturating_add(m.input_bytes);
            t.counters.merge(&m.counters);
        }
        for r in &self.reduces {
            if let ReduceState::Done {
                records,
                runs,
                run_bytes,
                shuffled_bytes,
                counters,
            } = r
            {
                t.reduces_done += 1;
                t.map_runs = t.map_runs.saturating_add(*runs);
                t.map_output_bytes = t.map_output_bytes.saturating_add(*run_bytes);
                t.records = t.records.saturating_add(*records);
                t.shuffled_bytes = t.shuffled_bytes.saturating_add(*shuffled_bytes);
                t.counters.merge(counters);
            }
        }
        t
    }

    /// How many splits have their output somewhere now.
    pub(crate) fn maps_done(&self) -> usize {
        self.done_maps
    }

    pub(crate) fn maps(&self) -> usize {
        self.maps.len()
    }

    pub(crate) fn reduces(&self) -> usize {
        self.reduces.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(i: u64) -> Split {
        Split {
            file: "in".into(),
            start: i * 10,
            end: i * 10 + 10,
        }
    }

    fn mapped(holder: u32, lines: u64) -> TaskResult {
        let mut counters = Counters::default();
        counters.add("lines", lines);
        TaskResult::Mapped {
            holder,
            input_bytes: 10,
            counters,
        }
    }

    fn reduced() -> TaskResult {
        TaskResult::Reduced {
            records: 1,
            runs: 2,
            run_bytes: 5,
            shuffled_bytes: 3,
            counters: Counters::default(),
        }
    }

    /// The splits and batches of `tasks`, which must all be maps (reduces wait until the maps are back).
    fn maps(tasks: &[(u64, Task)]) -> Vec<(u32, u64)> {
        tasks
            .iter()
            .map(|(_, t)| match t {
                Task::Map { index, batch, .. } => (*index, *batch),
                other => panic!("only maps until they are back: {other:?}"),
            })
            .collect()
    }

    fn puts(step: Step) -> Vec<(u64, Task)> {
        match step {
            Step::Put(p) => p,
            other => panic!("expected puts, got {other:?}"),
        }
    }

    fn sources(task: &Task) -> &[Source] {
        match task {
            Task::Reduce { sources, .. } => sources,
            other => panic!("a reduce expected: {other:?}"),
        }
    }

    #[test]
    fn reduces_go_out_when_every_map_is_done_with_each_batch_and_its_tasks() {
        let mut m = Master::new(vec![split(0), split(1), split(2)], 2, "out".into());
        let first = m.start();
        assert_eq!(maps(&first), vec![(0, 0), (1, 0), (2, 0)]);
        assert!(puts(m.on_result(first[0].0, &first[0].1, mapped(1, 3))).is_empty());
        assert!(puts(m.on_result(first[1].0, &first[1].1, mapped(0, 4))).is_empty());
        let reduces = puts(m.on_result(first[2].0, &first[2].1, mapped(1, 5)));
        assert_eq!(reduces.len(), 2);
        let expect = vec![
            Source {
                holder: 0,
                batch: 0,
                tasks: vec![first[1].0],
            },
            Source {
                holder: 1,
                batch: 0,
                tasks: vec![first[0].0, first[2].0],
            },
        ];
        // Every partition reads every batch, from one list the reduces share (at the bounds a job may
        // have, a list each would take gigabytes).
        assert_eq!(sources(&reduces[0].1), expect);
        assert!(std::ptr::eq(sources(&reduces[0].1), sources(&reduces[1].1)));
        assert_eq!(
            m.on_result(reduces[0].0, &reduces[0].1, reduced()),
            Step::Put(vec![])
        );
        assert_eq!(
            m.on_result(reduces[1].0, &reduces[1].1, reduced()),
            Step::Finished
        );
        let t = m.totals();
        assert_eq!((t.maps_done, t.reduces_done, t.records), (3, 2, 2));
        assert_eq!(t.counters.get("lines"), 12);
        // Runs and their bytes as the reduces read them.
        assert_eq!(
            (t.map_runs, t.map_output_bytes, t.shuffled_bytes),
            (4, 10, 6)
        );
    }

    #[test]
    fn no_input_puts_the_reduces_at_once() {
        let mut m = Master::new(vec![], 3, "out".into());
        let first = m.start();
        assert_eq!(first.len(), 3);
        assert!(first
            .iter()
            .all(|(_, t)| matches!(t, Task::Reduce { sources, .. } if sources.is_empty())));
    }

    #[test]
    fn a_holder_lost_in_the_map_phase_has_its_maps_redone_into_the_first_batch() {
        let mut m = Master::new(vec![split(0), split(1), split(2)], 2, "out".into());
        let first = m.start();
        assert!(puts(m.on_result(first[0].0, &first[0].1, mapped(2, 1))).is_empty());
        // No reduce has been told of any batch yet: the map made again joins batch 0 too.
        let again = m.lose(2);
        assert_eq!(maps(&again), vec![(0, 0)]);
        assert_eq!(m.redone, 1);
        assert!(puts(m.on_result(first[1].0, &first[1].1, mapped(0, 1))).is_empty());
        assert!(puts(m.on_result(first[2].0, &first[2].1, mapped(1, 1))).is_empty());
        let reduces = puts(m.on_result(again[0].0, &again[0].1, mapped(1, 1)));
        assert_eq!(reduces.len(), 2);
        let s = sources(&reduces[0].1);
        assert!(s.iter().all(|s| s.holder != 2 && s.batch == 0), "{s:?}");
        assert_eq!(s.iter().map(|s| s.tasks.len()).sum::<usize>(), 3);
    }

    #[test]
    fn a_lost_holder_has_its_maps_redone_into_a_new_batch_then_the_partition_again() {
        let mut m = Master::new(vec![split(0), split(1), split(2)], 2, "out".into());
        let first = m.start();
        let holders = [0, 1, 1];
        let mut reduces = Vec::new();
        for ((id, task), h) in first.iter().zip(holders) {
            reduces.extend(puts(m.on_result(*id, task, mapped(h, 1))));
        }
        assert_eq!(reduces.len(), 2);
        // Partition 0 is written; partition 1's reducer finds rank 1 gone.
        assert_eq!(
            m.on_result(reduces[0].0, &reduces[0].1, reduced()),
            Step::Put(vec![])
        );
        let again = puts(m.on_result(reduces[1].0, &reduces[1].1, TaskResult::Lost { holder: 1 }));
        // Batch 0 was named to reduces: the maps made again go into batch 1.
        assert_eq!(maps(&again), vec![(1, 1), (2, 1)]);
        assert_eq!(m.redone, 2);
        assert_eq!(
            m.maps_done(),
            1,
            "only the split held by rank 0 has output now"
        );
        // A second reducer reporting the same loss changes nothing.
        assert!(
            puts(m.on_result(reduces[1].0, &reduces[1].1, TaskResult::Lost { holder: 1 }))
                .is_empty()
        );
        // A late result from the lost rank is not trusted: its output went with it.
        let late = puts(m.on_result(again[0].0, &again[0].1, mapped(1, 1)));
        assert_eq!(maps(&late), vec![(1, 1)]);
        assert_eq!(m.redone, 3);
        // A stale id is ignored; map 1's current attempt is taken, and nothing goes out while map 2
        // runs (`only` below shows that it was taken: partition 1 goes out once map 2 is done).
        assert!(puts(m.on_result(first[1].0, &first[1].1, mapped(0, 1))).is_empty());
        assert!(puts(m.on_result(late[0].0, &late[0].1, mapped(0, 1))).is_empty());
        let only = puts(m.on_result(again[1].0, &again[1].1, mapped(2, 1)));
        assert_eq!(
            only.len(),
            1,
            "only the partition not yet written goes out again"
        );
        let Task::Reduce {
            partition, sources, ..
        } = &only[0].1
        else {
            panic!()
        };
        assert_eq!(*partition, 1);
        assert_eq!(
            &sources[..],
            &[
                Source {
                    holder: 0,
                    batch: 0,
                    tasks: vec![first[0].0]
                },
                Source {
                    holder: 0,
                    batch: 1,
                    tasks: vec![late[0].0]
                },
                Source {
                    holder: 2,
                    batch: 1,
                    tasks: vec![again[1].0]
                }
            ]
        );
        // Maps put after this reduce would go into batch 2.
        assert_eq!(maps(&m.lose(2)), vec![(2, 2)]);
    }

    #[test]
    fn a_holder_lost_once_every_partition_is_written_costs_nothing_and_every_split_counts() {
        let mut m = Master::new(vec![split(0), split(1)], 1, "out".into());
        let first = m.start();
        let mut reduces = Vec::new();
        for ((id, task), h) in first.iter().zip([0, 1]) {
            reduces.extend(puts(m.on_result(*id, task, mapped(h, 1))));
        }
        assert_eq!(
            m.on_result(reduces[0].0, &reduces[0].1, reduced()),
            Step::Finished
        );
        assert!(m.lose(1).is_empty());
        let t = m.totals();
        assert_eq!(t.counters.get("lines"), 2);
        assert_eq!((t.maps_done, t.input_bytes), (2, 20));
    }

    #[test]
    fn a_holder_lost_in_the_reduce_phase_has_its_maps_redone_and_every_split_counts_once() {
        // Rank 1 is lost while partition 1's reduce runs, after partition 0 is written.
        let mut m = Master::new(vec![split(0), split(1), split(2)], 2, "out".into());
        let first = m.start();
        let mut reduces = Vec::new();
        for ((id, task), h) in first.iter().zip([0, 1, 1]) {
            reduces.extend(puts(m.on_result(*id, task, mapped(h, 1))));
        }
        assert_eq!(
            m.on_result(reduces[0].0, &reduces[0].1, reduced()),
            Step::Put(vec![])
        );
        let again = m.lose(1);
        assert_eq!(maps(&again), vec![(1, 1), (2, 1)]);
        // Partition 1's reducer had fetched everything before the loss: the job ends before the new maps
        // do, and every split's counters are in the totals.
        assert_eq!(
            m.on_result(reduces[1].0, &reduces[1].1, reduced()),
            Step::Finished
        );
        let t = m.totals();
        assert_eq!(t.counters.get("lines"), 3);
        assert_eq!((t.maps_done, t.input_bytes), (3, 30));
        // A new map, if it ends after all, replaces its split's figures rather than adding to them: 1
        // line each for splits 0 and 2, and now 5 for split 1.
        let _ = m.on_result(again[0].0, &again[0].1, mapped(0, 5));
        assert_eq!(m.totals().counters.get("lines"), 7);
    }

    #[test]
    fn a_failed_task_fails_the_job() {
        let mut m = Master::new(vec![split(0)], 1, "out".into());
        let first = m.start();
        let step = m.on_result(
            first[0].0,
            &first[0].1,
            TaskResult::Failed {
                what: "boom".into(),
            },
        );
        assert_eq!(step, Step::Failed("boom".into()));
    }
}
