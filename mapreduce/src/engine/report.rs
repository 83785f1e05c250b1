//! What a job did, as the master saw it: the report `MapReduce::run` returns on rank 0, and its summary.

use crate::Counters;
use std::path::PathBuf;
use std::time::Duration;

/// What a job did, as the master saw it.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// Map tasks (one per split).
    pub maps: usize,
    /// Reduce tasks (one per partition).
    pub reduces: usize,
    /// Map tasks done again because the rank holding their output was lost.
    pub redone_maps: usize,
    /// Bytes of input read.
    pub input_bytes: u64,
    /// Bytes of map output the reduces read (after combining: each rank folds the output of the maps it
    /// runs together).
    pub map_output_bytes: u64,
    /// Sorted runs of map output the reduces read: for each partition, one per task slot that ran maps
    /// (ranks times threads), more when map output spilled past the memory budget.
    pub map_runs: u64,
    /// Bytes of map output that crossed between ranks.
    pub shuffled_bytes: u64,
    /// Lines written to the output.
    pub output_records: u64,
    /// The job's counters, summed.
    pub counters: Counters,
    /// From the start until every map output existed for the first time.
    pub map_time: Duration,
    /// From the start until every partition was written.
    pub total_time: Duration,
    /// The output files, in partition order.
    pub output_files: Vec<PathBuf>,
    /// Ranks in the job.
    pub ranks: usize,
    /// Threads each rank used inside a task (the master's setting).
    pub threads: usize,
}

impl std::fmt::Display for JobReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: u64| b as f64 / 1e6;
        writeln!(
            f,
            "mapreduce: {} ranks x {} threads, {} maps ({} redone), {} reduces",
            self.ranks, self.threads, self.maps, self.redone_maps, self.reduces
        )?;
        writeln!(
            f,
            "  input {:.1} MB, map output {:.1} MB in {} runs, shuffled {:.1} MB, {} output records",
            mb(self.input_bytes),
            mb(self.map_output_bytes),
            self.map_runs,
            mb(self.shuffled_bytes),
            self.output_records
        )?;
        write!(
            f,
            "  map phase {:.3} s, total {:.3} s",
            self.map_time.as_secs_f64(),
            self.total_time.as_secs_f64()
        )?;
        for (name, n) in self.counters.iter() {
            write!(f, "\n  counter {name}: {n}")?;
        }
        Ok(())
    }
}
