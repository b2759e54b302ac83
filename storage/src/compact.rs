//! Compaction: merging a partition's many small interval files into few
//! sorted ones, so a query opens a handful of files instead of one per
//! second per worker.
//!
//! Only committed files (every interval before the checkpoint) of this
//! process are merged, in runs of consecutive intervals up to a row budget.
//! The merged file is written under a temporary name, fsynced and renamed;
//! then its inputs are deleted. A crash between the two leaves inputs that
//! the compacted file covers: readers skip them and recovery deletes them.

use std::fs::File;
use std::path::Path;

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
    /// Compact a partition once it holds this many committed interval files.
    pub min_files: usize,
    /// Most rows in one compacted file.
    pub max_rows: usize,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        Self {
            min_files: 16,
            max_rows: 1 << 20,
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

/// Compacts this process's committed files in every partition of both tables.
pub fn compact(
    root: &Path,
    process: usize,
    checkpoint: u64,
    policy: &CompactionPolicy,
) -> Result<CompactionStats, StorageError> {
    let mut stats = CompactionStats::default();
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
            let mut run: Vec<(DataFile, usize)> = Vec::new();
            let mut run_rows = 0;
            let mut run_sealed = false;
            for f in files {
                let (rows, sealed) = row_count(&f.path)?;
                // Sealed and clear files (encryption turned on or off) are
                // merged apart: their schemas differ.
                if !run.is_empty() && (run_rows + rows > policy.max_rows || sealed != run_sealed) {
                    merge_run(&dir, process, std::mem::take(&mut run), sort, &mut stats)?;
                    run_rows = 0;
                }
                run_rows += rows;
                run_sealed = sealed;
                run.push((f, rows));
            }
            merge_run(&dir, process, run, sort, &mut stats)?;
        }
    }
    Ok(stats)
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
