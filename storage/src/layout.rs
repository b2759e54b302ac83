//! Where the store keeps what, and how its file names are read back.
//!
//! ```text
//! {data}/readings/date=2026-11-25/hour=14/e1764079200000-p0-w1.parquet
//! {data}/readings/date=2026-11-25/hour=14/c1764079200000-1764082799000-p0.parquet
//! {data}/deadletters/date=…/hour=…/…      (the same naming)
//! {data}/state/e1764079200000-p0-w1.json   (device states as of an interval)
//! {data}/state/base-p0.json                (consolidated older states)
//! {data}/checkpoint-p0.json                (the storage checkpoint)
//! ```
//!
//! Partitions are Hive-style (`date=`/`hour=`) by the reading's own time
//! (dead letters: by receipt), so pyarrow, DuckDB and Polars read the tree
//! as one dataset. An `e` file holds one flush interval of one dataflow
//! worker, named by the interval's start epoch (ms); a `c` file is a
//! compaction of every `e` file of one process in its directory whose
//! interval lies in its range.

use std::path::{Path, PathBuf};

use jiff::Timestamp;
use jiff::tz::TimeZone;
use wardflow_model::TimestampNs;

pub const READINGS_DIR: &str = "readings";
pub const DEAD_LETTERS_DIR: &str = "deadletters";
pub const STATE_DIR: &str = "state";
const NS_PER_HOUR: i64 = 3_600_000_000_000;

/// The hour a time falls in, as whole hours since the epoch.
#[inline]
pub fn hour_of(ns: TimestampNs) -> i64 {
    ns.div_euclid(NS_PER_HOUR)
}

/// `[start, end)` of an hour, in ns.
pub fn hour_bounds(hour: i64) -> (TimestampNs, TimestampNs) {
    (hour * NS_PER_HOUR, (hour + 1) * NS_PER_HOUR)
}

/// The partition directory (relative to the table) of an hour.
pub fn partition_dir(hour: i64) -> String {
    let ts = Timestamp::from_second(hour * 3600).unwrap_or(Timestamp::UNIX_EPOCH);
    let z = ts.to_zoned_datetime(TimeZone::UTC);
    format!("date={}/hour={:02}", z.date(), z.hour())
}

/// Parses `date=YYYY-MM-DD/hour=HH` back into an hour index.
pub fn parse_partition(date: &str, hour: &str) -> Option<i64> {
    let date: jiff::civil::Date = date.strip_prefix("date=")?.parse().ok()?;
    let hour: i8 = hour.strip_prefix("hour=")?.parse().ok()?;
    let ts = date
        .at(hour, 0, 0, 0)
        .to_zoned_datetime(TimeZone::UTC)
        .ok()?
        .timestamp();
    Some(ts.as_second().div_euclid(3600))
}

/// What a data file's name says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileName {
    /// One flush interval of one worker.
    Interval {
        start: u64,
        process: usize,
        worker: usize,
    },
    /// A compaction of a process's interval files with starts in `[min, max]`.
    Compacted { min: u64, max: u64, process: usize },
}

impl FileName {
    pub fn parse(name: &str) -> Option<FileName> {
        let stem = name
            .strip_suffix(".parquet")
            .or_else(|| name.strip_suffix(".json"))?;
        if let Some(rest) = stem.strip_prefix('e') {
            let mut it = rest.split('-');
            let start = it.next()?.parse().ok()?;
            let process = it.next()?.strip_prefix('p')?.parse().ok()?;
            let worker = it.next()?.strip_prefix('w')?.parse().ok()?;
            it.next().is_none().then_some(FileName::Interval {
                start,
                process,
                worker,
            })
        } else if let Some(rest) = stem.strip_prefix('c') {
            let mut it = rest.split('-');
            let min = it.next()?.parse().ok()?;
            let max = it.next()?.parse().ok()?;
            let process = it.next()?.strip_prefix('p')?.parse().ok()?;
            it.next()
                .is_none()
                .then_some(FileName::Compacted { min, max, process })
        } else {
            None
        }
    }

    pub fn render(&self, ext: &str) -> String {
        match *self {
            FileName::Interval {
                start,
                process,
                worker,
            } => format!("e{start:013}-p{process}-w{worker}.{ext}"),
            FileName::Compacted { min, max, process } => {
                format!("c{min:013}-{max:013}-p{process}.{ext}")
            }
        }
    }

    pub fn process(&self) -> usize {
        match *self {
            FileName::Interval { process, .. } | FileName::Compacted { process, .. } => process,
        }
    }

    /// The latest interval start the file holds data of.
    pub fn max_interval(&self) -> u64 {
        match *self {
            FileName::Interval { start, .. } => start,
            FileName::Compacted { max, .. } => max,
        }
    }

    /// The earliest interval start the file holds data of.
    pub fn min_interval(&self) -> u64 {
        match *self {
            FileName::Interval { start, .. } => start,
            FileName::Compacted { min, .. } => min,
        }
    }

    /// Whether `self` is made redundant by the compacted file `other`.
    pub fn covered_by(&self, other: &FileName) -> bool {
        match *other {
            FileName::Compacted { min, max, process } => {
                self != other
                    && self.process() == process
                    && self.min_interval() >= min
                    && self.max_interval() <= max
            }
            FileName::Interval { .. } => false,
        }
    }
}

/// A data file in a partition.
#[derive(Debug, Clone)]
pub struct DataFile {
    pub path: PathBuf,
    pub name: FileName,
    pub hour: i64,
}

/// Every partition directory of a table: (hour, path), sorted by hour.
pub fn partitions(table: &Path) -> std::io::Result<Vec<(i64, PathBuf)>> {
    let mut out = Vec::new();
    let dates = match std::fs::read_dir(table) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for date in dates {
        let date = date?;
        let Some(date_name) = date.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !date.file_type()?.is_dir() {
            continue;
        }
        for hour in std::fs::read_dir(date.path())? {
            let hour = hour?;
            if let Some(h) = hour
                .file_name()
                .to_str()
                .and_then(|n| parse_partition(&date_name, n))
            {
                out.push((h, hour.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// All data files of a partition, including ones covered by compactions.
pub fn files_in(hour: i64, dir: &Path) -> std::io::Result<Vec<DataFile>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(name) = entry.file_name().to_str().and_then(FileName::parse) {
            out.push(DataFile {
                path: entry.path(),
                name,
                hour,
            });
        }
    }
    out.sort_by_key(|f| (f.name.min_interval(), f.name.max_interval()));
    Ok(out)
}

/// The files of a partition a reader should read: covered files are left out.
pub fn live_files(hour: i64, dir: &Path) -> std::io::Result<Vec<DataFile>> {
    let all = files_in(hour, dir)?;
    let compacted: Vec<FileName> = all
        .iter()
        .map(|f| f.name)
        .filter(|n| matches!(n, FileName::Compacted { .. }))
        .collect();
    Ok(all
        .into_iter()
        .filter(|f| !compacted.iter().any(|c| f.name.covered_by(c)))
        .collect())
}

/// Writes `bytes` to `path` durably: a temporary file, fsync, rename.
/// The caller fsyncs the directory once for all files it wrote.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    write(&mut f)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// A file writer that writes its data back to disk a mebibyte at a time,
/// as it goes, instead of leaving it all to the final fsync.
///
/// A large file's fsync queues its whole size on the disk at once, and the
/// write-ahead log's small fsyncs (a publish's acknowledgement) wait behind
/// it; on ext4 in ordered mode a journal commit also waits for it. Written
/// back in steps (`sync_file_range`, as RocksDB's `bytes_per_sync` does), a
/// compaction or flush keeps at most one step in the disk's queue.
pub struct SteadyWriter {
    file: std::fs::File,
    written: u64,
    synced: u64,
}

impl SteadyWriter {
    const STEP: u64 = 1 << 20;

    pub fn new(file: std::fs::File) -> Self {
        Self {
            file,
            written: 0,
            synced: 0,
        }
    }
}

impl std::io::Write for SteadyWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.synced >= Self::STEP {
            use std::os::fd::AsRawFd as _;
            let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            // SAFETY: sync_file_range only reads its arguments; the
            // descriptor is owned by `self.file` and open.
            let rc = unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.synced as libc::off64_t,
                    (self.written - self.synced) as libc::off64_t,
                    flags,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            self.synced = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// fsyncs a directory so renames in it survive a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// A time as RFC 3339 in UTC with milliseconds, for messages.
pub fn format_ns(ns: TimestampNs) -> String {
    match Timestamp::from_nanosecond(ns as i128) {
        Ok(t) => t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        Err(_) => ns.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for n in [
            FileName::Interval {
                start: 1_764_079_200_000,
                process: 0,
                worker: 3,
            },
            FileName::Compacted {
                min: 1,
                max: 1_764_079_200_000,
                process: 2,
            },
        ] {
            assert_eq!(FileName::parse(&n.render("parquet")), Some(n));
            assert_eq!(FileName::parse(&n.render("json")), Some(n));
        }
        assert_eq!(FileName::parse("x.parquet"), None);
        assert_eq!(FileName::parse("e12-p0-w1.parquet.tmp"), None);
        assert_eq!(FileName::parse("e12-p0-w1-x.parquet"), None);
    }

    #[test]
    fn coverage_is_per_process_and_range() {
        let c = FileName::Compacted {
            min: 10,
            max: 20,
            process: 0,
        };
        assert!(
            FileName::Interval {
                start: 10,
                process: 0,
                worker: 1
            }
            .covered_by(&c)
        );
        assert!(
            FileName::Interval {
                start: 20,
                process: 0,
                worker: 0
            }
            .covered_by(&c)
        );
        assert!(
            !FileName::Interval {
                start: 21,
                process: 0,
                worker: 0
            }
            .covered_by(&c)
        );
        assert!(
            !FileName::Interval {
                start: 15,
                process: 1,
                worker: 0
            }
            .covered_by(&c)
        );
        assert!(
            FileName::Compacted {
                min: 12,
                max: 18,
                process: 0
            }
            .covered_by(&c)
        );
        assert!(!c.covered_by(&c));
    }

    #[test]
    fn partitions_render_and_parse() {
        let ns = 1_764_079_200_000_000_000; // 2025-11-25T14:00:00Z
        let h = hour_of(ns);
        assert_eq!(partition_dir(h), "date=2025-11-25/hour=14");
        assert_eq!(parse_partition("date=2025-11-25", "hour=14"), Some(h));
        assert_eq!(hour_bounds(h).0, ns);
        assert_eq!(hour_of(-1), -1);
    }
}
