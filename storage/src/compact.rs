//! Compaction: merging a partition's many small interval files into few
//! sorted ones, so a query opens a handful of files instead of one per
//! second per worker.
//!
//! Only committed files (every interval before the checkpoint) of this
//! process are merged, in runs of consecutive intervals up to a row budget.
//! A run always takes every file of each interval it spans: a compacted
//! file's name covers whole intervals (every worker's file of them), so a
//! run that ended between two workers' files of one interval would hide the
//! other file from readers and let recovery delete it.
//!
//! Compaction is size-tiered: an interval whose files already hold
//! `large_rows` rows (a busy second) is left as it is and ends the run
//! before it. Rewriting files that large would cost as much CPU and I/O as
//! writing them did and save a query little, and under heavy load that work
//! competed with ingest for the CPU. A quiet ward's one-second files stay
//! small and are merged as before.
//!
//! The merged file is written under a temporary name, fsynced and renamed;
//! then its inputs are deleted. A crash between the two leaves inputs that
//! the compacted file covers: readers skip them and recovery deletes them.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take_record_batch};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::StorageError;
use crate::layout::{self, DEAD_LETTERS_DIR, DataFile, FileName, READINGS_DIR};
use crate::schema::{self, dead_letters as dl, readings as rd};
use crate::writer::{sealed_writer_properties, write_parquet_file, writer_properties};

/// When and how much to compact.
#[derive(Debug, Clone, Copy)]
pub struct CompactionPolicy {
    /// Compact a partition once it holds this many committed interval files
    /// of small intervals.
    pub min_files: usize,
    /// Most rows in one compacted file.
    pub max_rows: usize,
    /// An interval whose files hold this many rows together is left as it
    /// is.
    pub large_rows: usize,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        Self {
            min_files: 16,
            max_rows: 1 << 20,
            large_rows: 1 << 18,
        }
    }
}

/// What one compaction pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactionStats {
    pub files_in: usize,
    pub files_out: usize,
    pub rows: u64,
}

/// Compacts this process's committed files in every partition of both
/// tables, once. [`Compactor`] does the same pass after pass, remembering
/// the row counts it has read.
pub fn compact(
    root: &Path,
    process: usize,
    checkpoint: u64,
    policy: &CompactionPolicy,
) -> Result<CompactionStats, StorageError> {
    Compactor::new(*policy).run(root, process, checkpoint)
}

/// Compaction pass after pass. Files of large intervals stay where they are,
/// so each pass would read their footers again; the compactor keeps each
/// file's row count and whether it is sealed, for the files that still
/// exist.
pub struct Compactor {
    policy: CompactionPolicy,
    sizes: HashMap<PathBuf, (usize, bool)>,
}

/// One interval's committed files of this process in one partition.
struct Interval {
    files: Vec<(DataFile, usize)>,
    rows: usize,
    /// `None`: sealed and clear files (encryption turned on or off within
    /// the interval), which cannot share a file.
    sealed: Option<bool>,
}

impl Compactor {
    pub fn new(policy: CompactionPolicy) -> Self {
        Self {
            policy,
            sizes: HashMap::new(),
        }
    }

    /// One pass over every partition of both tables.
    pub fn run(
        &mut self,
        root: &Path,
        process: usize,
        checkpoint: u64,
    ) -> Result<CompactionStats, StorageError> {
        let mut stats = CompactionStats::default();
        let mut seen = HashMap::with_capacity(self.sizes.len());
        let result = self.pass(root, process, checkpoint, &mut seen, &mut stats);
        // Files that are gone (merged, expired) are forgotten; on an error
        // the counts read so far are kept for the next pass.
        if result.is_ok() {
            self.sizes = seen;
        } else {
            self.sizes.extend(seen);
        }
        result.map(|()| stats)
    }

    fn pass(
        &mut self,
        root: &Path,
        process: usize,
        checkpoint: u64,
        seen: &mut HashMap<PathBuf, (usize, bool)>,
        stats: &mut CompactionStats,
    ) -> Result<(), StorageError> {
        let policy = self.policy;
        for (table, sort) in [
            (READINGS_DIR, Sort::Readings),
            (DEAD_LETTERS_DIR, Sort::DeadLetters),
        ] {
            let table = root.join(table);
            for (hour, dir) in layout::partitions(&table).map_err(StorageError::io(&table))? {
                let files: Vec<DataFile> = layout::files_in(hour, &dir)
                    .map_err(StorageError::io(&dir))?
                    .into_iter()
                    .filter(|f| {
                        matches!(f.name, FileName::Interval { process: p, start, .. } if p == process && start < checkpoint)
                    })
                    .collect();
                if files.len() < policy.min_files {
                    continue;
                }
                let mut intervals: Vec<Interval> = Vec::new();
                for f in files {
                    let (rows, sealed) = match self.sizes.get(&f.path) {
                        Some(&known) => known,
                        None => row_count(&f.path)?,
                    };
                    seen.insert(f.path.clone(), (rows, sealed));
                    match intervals.last_mut() {
                        Some(i) if i.files[0].0.name.min_interval() == f.name.min_interval() => {
                            i.rows += rows;
                            if i.sealed != Some(sealed) {
                                i.sealed = None;
                            }
                            i.files.push((f, rows));
                        }
                        _ => intervals.push(Interval {
                            files: vec![(f, rows)],
                            rows,
                            sealed: Some(sealed),
                        }),
                    }
                }
                let small = intervals
                    .iter()
                    .filter(|i| i.rows < policy.large_rows && i.sealed.is_some())
                    .map(|i| i.files.len())
                    .sum::<usize>();
                if small < policy.min_files {
                    continue;
                }
                let mut run: Vec<(DataFile, usize)> = Vec::new();
                let mut run_rows = 0;
                let mut run_sealed = false;
                for i in intervals {
                    let Some(sealed) = i.sealed.filter(|_| i.rows < policy.large_rows) else {
                        // Left as it is; the run cannot span it.
                        merge_run(&dir, process, std::mem::take(&mut run), sort, stats)?;
                        run_rows = 0;
                        continue;
                    };
                    if !run.is_empty()
                        && (run_rows + i.rows > policy.max_rows || sealed != run_sealed)
                    {
                        merge_run(&dir, process, std::mem::take(&mut run), sort, stats)?;
                        run_rows = 0;
                    }
                    run_rows += i.rows;
                    run_sealed = sealed;
                    run.extend(i.files);
                }
                merge_run(&dir, process, run, sort, stats)?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Sort {
    Readings,
    DeadLetters,
}

/// A file's rows, and whether it is sealed.
fn row_count(path: &Path) -> Result<(usize, bool), StorageError> {
    let file = File::open(path).map_err(StorageError::io(path))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| StorageError::Corrupt {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
    Ok((
        builder.metadata().file_metadata().num_rows() as usize,
        schema::is_sealed(builder.schema()),
    ))
}

fn merge_run(
    dir: &Path,
    process: usize,
    run: Vec<(DataFile, usize)>,
    sort: Sort,
    stats: &mut CompactionStats,
) -> Result<(), StorageError> {
    if run.len() < 2 {
        return Ok(());
    }
    let (min, max) = (
        run[0].0.name.min_interval(),
        run[run.len() - 1].0.name.max_interval(),
    );
    let mut batches = Vec::new();
    for (f, _) in &run {
        let file = File::open(&f.path).map_err(StorageError::io(&f.path))?;
        let corrupt = |e: parquet::errors::ParquetError| StorageError::Corrupt {
            path: f.path.clone(),
            what: e.to_string(),
        };
        for b in ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(corrupt)?
            .build()
            .map_err(corrupt)?
        {
            batches.push(b.map_err(|e| StorageError::Corrupt {
                path: f.path.clone(),
                what: e.to_string(),
            })?);
        }
    }
    let Some(schema) = batches.first().map(|b| b.schema()) else {
        return Ok(());
    };
    let sealed = schema::is_sealed(&schema);
    let enc = |e: arrow::error::ArrowError| StorageError::Encode(e.to_string());
    let all = concat_batches(&schema, &batches).map_err(enc)?;
    drop(batches);
    let keys: Vec<usize> = match (sort, sealed) {
        (Sort::Readings, false) => vec![rd::PATIENT, rd::METRIC, rd::TIME],
        // A sealed run (one patient's rows of one file) stays whole and in
        // order: rows are grouped by patient, runs kept in file order.
        (Sort::Readings, true) => vec![rd::PATIENT],
        (Sort::DeadLetters, _) => vec![dl::RECEIVED, dl::DEVICE],
    };
    let mut columns: Vec<SortColumn> = keys
        .iter()
        .map(|&k| SortColumn {
            values: all.column(k).clone(),
            options: None,
        })
        .collect();
    if sealed && matches!(sort, Sort::Readings) {
        columns.push(SortColumn {
            values: std::sync::Arc::new(arrow::array::UInt64Array::from_iter_values(
                0..all.num_rows() as u64,
            )),
            options: None,
        });
    }
    let order = lexsort_to_indices(&columns, None).map_err(enc)?;
    let sorted: RecordBatch = take_record_batch(&all, &order).map_err(enc)?;
    let name = FileName::Compacted { min, max, process };
    let props = match (sort, sealed) {
        (Sort::Readings, true) => sealed_writer_properties(),
        _ => writer_properties(),
    };
    write_parquet_file(&dir.join(name.render("parquet")), &sorted, props)?;
    layout::sync_dir(dir).map_err(StorageError::io(dir))?;
    for (f, _) in &run {
        std::fs::remove_file(&f.path).map_err(StorageError::io(&f.path))?;
    }
    layout::sync_dir(dir).map_err(StorageError::io(dir))?;
    stats.files_in += run.len();
    stats.files_out += 1;
    stats.rows += sorted.num_rows() as u64;
    Ok(())
}
