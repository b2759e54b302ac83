//! The QuestDB sink's throughput beside the embedded store's, in one run.
//!
//! ```text
//! cargo run --release -p wardflow-benches --bin questdb_sink -- --rows 2000000 --repeat 3
//! ```
//!
//! It generates the same readings for every contender (100 patients, one
//! monitor each, seven vitals, one reading per vital per second), cut into
//! flush intervals of `--interval-rows` rows, each in a `ShardWriter` as the
//! dataflow's Store operator fills it, and times, per contender, what a
//! flush does with an interval:
//!
//! - **buffer fill**: encoding the rows of ready batches as ILP into
//!   questdb-rs's `Buffer` (no sink, no network): the upper bound of any
//!   ILP sink;
//! - **QuestDB sink → VictoriaMetrics (HTTP)**: `Batch::from_writer`,
//!   `submit` and waiting for the receipt, as a flush thread does, against
//!   a real VictoriaMetrics (`/usr/bin/victoria-metrics`, started on free
//!   ports with a temporary data directory; `http::...;protocol_version=1;`),
//!   so each interval is accepted by the receiver before the next starts;
//! - the same over **TCP** (`-influxListenAddr`);
//! - **questdb-rs alone → VictoriaMetrics (HTTP)**: the ready batches
//!   encoded and flushed by a questdb-rs `Sender` on this thread, with no
//!   sink around it (no queue, receipts or spool): what the receiver takes
//!   at best, so the sink's own cost is the gap to it;
//! - **embedded store**: `ShardWriter::flush_before`, unencrypted Parquet
//!   (zstd), fsynced, as the embedded backend writes it.
//!
//! It prints rows/s for each (best of `--repeat`) and the ratio of each to
//! the embedded store.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use wardflow_benches::{free_port, http_get};
use wardflow_model::{DeviceId, Metric, PatientId, Quality, Reading};
use wardflow_storage::questdb::{self, Batch, QuestDbSink, SinkConfig, SinkStats};
use wardflow_storage::{Origin, ShardWriter, StoreConfig};

#[derive(clap::Parser)]
struct Options {
    /// Readings per run.
    #[arg(long, default_value_t = 2_000_000)]
    rows: usize,
    /// Readings per flush interval (what one flush hands over).
    #[arg(long, default_value_t = 100_000)]
    interval_rows: usize,
    /// Runs per contender; the best is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// The VictoriaMetrics binary.
    #[arg(long, default_value = "/usr/bin/victoria-metrics")]
    victoria_metrics: PathBuf,
}

const VITALS: [Metric; 7] = [
    Metric::Hr,
    Metric::Spo2,
    Metric::Rr,
    Metric::Sbp,
    Metric::Dbp,
    Metric::Map,
    Metric::Temp,
];
const PATIENTS: usize = 100;
const T0: i64 = 1_764_000_000_000_000_000;

/// One interval's readings in a writer, as the Store operator leaves it.
/// `first` is the index of its first reading in the run; `run` shifts the
/// times so runs do not overwrite one another in the receiver.
fn interval(
    dir: &Path,
    first: usize,
    n: usize,
    run: usize,
    ids: &[(DeviceId, PatientId)],
) -> ShardWriter<u8> {
    let config = StoreConfig {
        root: dir.to_path_buf(),
        process: 0,
        interval_ms: 1000,
    };
    let mut w: ShardWriter<u8> = ShardWriter::new(config, 0);
    let base = T0 + run as i64 * 86_400_000_000_000;
    // Readings of one device per publish: a tick of all seven vitals.
    let mut i = first;
    let mut readings = Vec::with_capacity(VITALS.len());
    while i < first + n {
        let tick = i / (PATIENTS * VITALS.len());
        let p = (i / VITALS.len()) % PATIENTS;
        let time_ns = base + tick as i64 * 1_000_000_000 + p as i64 * 1_000;
        readings.clear();
        for (k, &metric) in VITALS.iter().enumerate() {
            if i + k >= first + n {
                break;
            }
            readings.push(Reading {
                time_ns,
                metric,
                value: 40.0 + ((i + k) % 90) as f64 + 0.5,
                seq: Some((i + k) as u64),
                quality: Quality::default(),
            });
        }
        let (device, patient) = &ids[p];
        w.append(
            1_764_000_000_000,
            Origin {
                device,
                patient: Some(patient),
                received_ns: time_ns + 2_000_000,
            },
            &readings,
            [],
            0,
        );
        i += readings.len();
    }
    w
}

struct Vm {
    child: Child,
    http: u16,
    influx: u16,
}

impl Vm {
    fn start(bin: &Path, data: &Path) -> anyhow::Result<Vm> {
        if !bin.exists() {
            bail!(
                "{} not found: apt-get install victoria-metrics",
                bin.display()
            );
        }
        let (http, influx) = (free_port(), free_port());
        let child = Command::new(bin)
            .arg(format!("-storageDataPath={}", data.display()))
            .arg("-retentionPeriod=100y")
            .arg("-dedup.minScrapeInterval=1ms")
            .arg(format!("-httpListenAddr=127.0.0.1:{http}"))
            .arg(format!("-influxListenAddr=127.0.0.1:{influx}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting victoria-metrics")?;
        let vm = Vm {
            child,
            http,
            influx,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(http, "/health").is_none() {
            if Instant::now() > deadline {
                bail!("victoria-metrics did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(vm)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let o = <Options as clap::Parser>::parse();
    let tmp = tempfile::tempdir()?;
    let vm = Vm::start(&o.victoria_metrics, &tmp.path().join("vm"))?;
    let ids: Vec<(DeviceId, PatientId)> = (0..PATIENTS)
        .map(|p| {
            (
                DeviceId::new(&format!("mon-{p:03}")).unwrap(),
                PatientId::new(&format!("p-{p:03}")).unwrap(),
            )
        })
        .collect();
    let chunks: Vec<(usize, usize)> = (0..o.rows)
        .step_by(o.interval_rows)
        .map(|f| (f, o.interval_rows.min(o.rows - f)))
        .collect();
    let writers = |dir: &Path, run: usize| -> Vec<ShardWriter<u8>> {
        chunks
            .iter()
            .map(|&(f, n)| interval(dir, f, n, run, &ids))
            .collect()
    };
    let http_conf = format!("http::addr=127.0.0.1:{};protocol_version=1;", vm.http);
    let tcp_conf = format!("tcp::addr=127.0.0.1:{};protocol_version=1;", vm.influx);

    let mut best = [f64::MAX; 5];
    let names = [
        "questdb-rs Buffer fill only (no I/O)",
        "QuestDB sink -> VictoriaMetrics, ILP/HTTP",
        "QuestDB sink -> VictoriaMetrics, ILP/TCP",
        "embedded store (Parquet, unencrypted)",
        "questdb-rs Sender alone -> VM, ILP/HTTP",
    ];
    let mut run = 0;
    for _ in 0..o.repeat {
        // (a) Encoding alone, from batches made beforehand.
        {
            let batches: Vec<Batch> = writers(tmp.path(), run)
                .iter()
                .map(Batch::from_writer)
                .collect();
            let started = Instant::now();
            let mut buf = questdb::buffer_for(&http_conf);
            let mut bytes = 0;
            for batch in &batches {
                let mut at = 0;
                while at < batch.rows() {
                    buf.clear();
                    at = batch.encode(&mut buf, at, 50_000)?;
                    bytes += buf.len();
                }
            }
            best[0] = best[0].min(started.elapsed().as_secs_f64());
            std::hint::black_box(bytes);
        }
        // The receiver's ceiling: questdb-rs alone, no sink.
        {
            run += 1;
            let batches: Vec<Batch> = writers(tmp.path(), run)
                .iter()
                .map(Batch::from_writer)
                .collect();
            let mut sender = ::questdb::ingress::Sender::from_conf(&http_conf)?;
            let mut buf = sender.new_buffer();
            let started = Instant::now();
            for batch in &batches {
                let mut at = 0;
                while at < batch.rows() {
                    buf.clear();
                    at = batch.encode(&mut buf, at, 50_000)?;
                    sender.flush_and_keep(&buf)?;
                }
            }
            best[4] = best[4].min(started.elapsed().as_secs_f64());
        }
        // (b), (c) Through the sink to the receiver.
        for (k, conf) in [(1, &http_conf), (2, &tcp_conf)] {
            run += 1;
            let ws = writers(tmp.path(), run);
            let spool = tmp.path().join(format!("spool-{run}"));
            let stats = Arc::new(SinkStats::default());
            let sink = QuestDbSink::start(SinkConfig::new(conf.clone(), &spool), stats.clone())?;
            let handle = sink.handle();
            let started = Instant::now();
            for w in &ws {
                handle.submit(Batch::from_writer(w))?.wait()?;
            }
            best[k] = best[k].min(started.elapsed().as_secs_f64());
            sink.shutdown();
            let spooled = stats
                .rows_spooled
                .load(std::sync::atomic::Ordering::Relaxed);
            if spooled > 0 {
                eprintln!(
                    "note: {spooled} rows went through the spool in run {run} ({})",
                    names[k]
                );
            }
        }
        // (d) The embedded store.
        {
            let dir = tmp.path().join(format!("store-{run}"));
            let ws = writers(&dir, run);
            let started = Instant::now();
            for mut w in ws {
                w.flush_before(None)?;
            }
            best[3] = best[3].min(started.elapsed().as_secs_f64());
            std::fs::remove_dir_all(&dir)?;
        }
    }
    let rate = |secs: f64| o.rows as f64 / secs;
    let embedded = rate(best[3]);
    println!(
        "{} readings in intervals of {}, best of {}:",
        o.rows, o.interval_rows, o.repeat
    );
    println!("{:<44} {:>14} {:>12}", "", "rows/s", "vs embedded");
    for (name, secs) in names.iter().zip(best) {
        println!(
            "{:<44} {:>14.0} {:>11.2}x",
            name,
            rate(secs),
            rate(secs) / embedded
        );
    }
    Ok(())
}
