//! The engine's metrics and the registry `/metrics` serves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use wardflow_ingest::metrics::IngestMetrics;
use wardflow_storage::questdb::SinkStats;

/// Dataflow and storage metrics.
pub struct EngineMetrics {
    pub readings_stored: Counter,
    pub dead_letters_stored: Counter,
    pub storage_files_written: Counter,
    pub storage_bytes_written: Counter,
    pub storage_flush_seconds: Histogram,
    pub storage_errors: Counter,
    pub storage_pending_readings: Gauge,
    pub compaction_files_merged: Counter,
    pub retention_partitions_dropped: Counter,
    pub retention_rows_dropped: Counter,
    pub checkpoint_epoch_ms: Gauge,
    pub dataflow_lag_ms: Gauge,
    pub dataflow_workers: Gauge,
    pub alert_transitions: Family<[(&'static str, &'static str); 1], Counter>,
    pub alert_log_errors: Counter,
    pub rules_loaded: Gauge,
    pub rules_reload_failures: Gauge,
    pub ledger_leaves: Counter,
    pub ledger_batches: Counter,
    pub ledger_pending_leaves: Gauge,
    pub ledger_sealed_to_ms: Gauge,
    pub ledger_seal_seconds: Histogram,
    pub ledger_errors: Counter,
    pub ledger_chain_pending_batches: Gauge,
    pub ledger_chain_anchored_batches: Gauge,
    pub ledger_chain_extrinsics: Gauge,
    pub ledger_chain_errors: Gauge,
    pub ledger_chain_last_block: Gauge,
    pub ledger_chain_connected: Gauge,
    pub consent_last_block: Gauge,
    pub consent_records: Gauge,
    pub consent_refused: Gauge,
    pub consent_errors: Gauge,
    pub research_windows_released: Family<[(&'static str, String); 1], Gauge>,
    pub research_epsilon_spent: Family<[(&'static str, String); 1], Gauge<f64, AtomicU64>>,
    pub research_patients_contributing: Family<[(&'static str, String); 1], Gauge>,
    pub research_rows_read: Family<[(&'static str, String); 2], Gauge>,
    pub research_batches_read: Family<[(&'static str, String); 2], Gauge>,
    pub research_bytes_read: Family<[(&'static str, String); 2], Gauge>,
    /// The QuestDB sink's own counters (all zero when it does not run).
    pub questdb: Arc<SinkStats>,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self {
            readings_stored: Counter::default(),
            dead_letters_stored: Counter::default(),
            storage_files_written: Counter::default(),
            storage_bytes_written: Counter::default(),
            // 100 µs .. ~3 s
            storage_flush_seconds: Histogram::new(exponential_buckets(100e-6, 2.0, 16)),
            storage_errors: Counter::default(),
            storage_pending_readings: Gauge::default(),
            compaction_files_merged: Counter::default(),
            retention_partitions_dropped: Counter::default(),
            retention_rows_dropped: Counter::default(),
            checkpoint_epoch_ms: Gauge::default(),
            dataflow_lag_ms: Gauge::default(),
            dataflow_workers: Gauge::default(),
            alert_transitions: Family::default(),
            alert_log_errors: Counter::default(),
            rules_loaded: Gauge::default(),
            rules_reload_failures: Gauge::default(),
            ledger_leaves: Counter::default(),
            ledger_batches: Counter::default(),
            ledger_pending_leaves: Gauge::default(),
            ledger_sealed_to_ms: Gauge::default(),
            // 100 µs .. ~3 s
            ledger_seal_seconds: Histogram::new(exponential_buckets(100e-6, 2.0, 16)),
            ledger_errors: Counter::default(),
            ledger_chain_pending_batches: Gauge::default(),
            ledger_chain_anchored_batches: Gauge::default(),
            ledger_chain_extrinsics: Gauge::default(),
            ledger_chain_errors: Gauge::default(),
            ledger_chain_last_block: Gauge::default(),
            ledger_chain_connected: Gauge::default(),
            research_windows_released: Family::default(),
            research_epsilon_spent: Family::default(),
            research_patients_contributing: Family::default(),
            research_rows_read: Family::default(),
            research_batches_read: Family::default(),
            research_bytes_read: Family::default(),
            consent_last_block: Gauge::default(),
            consent_records: Gauge::default(),
            consent_refused: Gauge::default(),
            consent_errors: Gauge::default(),
            questdb: Arc::default(),
        }
    }
}

impl EngineMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "alert_transitions",
            "Alert transitions by event (raised, acknowledged, escalated, resolved, ...)",
            self.alert_transitions.clone(),
        );
        r.register(
            "alert_log_errors",
            "Failed writes to the alert log",
            self.alert_log_errors.clone(),
        );
        r.register(
            "rules_loaded",
            "Alert rules in force",
            self.rules_loaded.clone(),
        );
        r.register(
            "rules_reload_failures",
            "Rule file changes refused (the previous rules kept running)",
            self.rules_reload_failures.clone(),
        );
        r.register(
            "ledger_leaves",
            "Audit-trail leaves received from storage flushes",
            self.ledger_leaves.clone(),
        );
        r.register(
            "ledger_batches",
            "Audit batches sealed and anchored",
            self.ledger_batches.clone(),
        );
        r.register(
            "ledger_pending_leaves",
            "Leaves waiting for their anchor interval to be stored in full",
            self.ledger_pending_leaves.clone(),
        );
        r.register(
            "ledger_sealed_to_ms",
            "Every leaf of a dataflow epoch (ms since epoch) before this is sealed and anchored",
            self.ledger_sealed_to_ms.clone(),
        );
        r.register(
            "ledger_seal_seconds",
            "Time to seal and anchor the batches of one pass",
            self.ledger_seal_seconds.clone(),
        );
        r.register(
            "ledger_errors",
            "Failed anchor writes (retried)",
            self.ledger_errors.clone(),
        );
        for (name, help, g) in [
            (
                "ledger_chain_pending_batches",
                "Sealed batches not yet anchored on the chain (queued in the anchor log)",
                &self.ledger_chain_pending_batches,
            ),
            (
                "ledger_chain_anchored_batches",
                "Batches anchored on the chain since start",
                &self.ledger_chain_anchored_batches,
            ),
            (
                "ledger_chain_extrinsics",
                "Anchoring extrinsics finalized since start",
                &self.ledger_chain_extrinsics,
            ),
            (
                "ledger_chain_errors",
                "Failed chain connections or submissions since start (retried)",
                &self.ledger_chain_errors,
            ),
            (
                "ledger_chain_last_block",
                "Number of the block that holds the latest anchor",
                &self.ledger_chain_last_block,
            ),
            (
                "ledger_chain_connected",
                "1 while the anchorer holds a connection to the chain",
                &self.ledger_chain_connected,
            ),
            (
                "consent_last_block",
                "The last finalized block read for consent records",
                &self.consent_last_block,
            ),
            (
                "consent_records",
                "Consent records read from the chain since start",
                &self.consent_records,
            ),
            (
                "consent_refused",
                "Consent records refused since start (see the log for why)",
                &self.consent_refused,
            ),
            (
                "consent_errors",
                "Failed reads of the chain for consent records since start (retried)",
                &self.consent_errors,
            ),
        ] {
            r.register(name, help, g.clone());
        }
        r.register(
            "research_windows_released",
            "Windows a study released",
            self.research_windows_released.clone(),
        );
        r.register(
            "research_epsilon_spent",
            "Privacy budget a study spent, as epsilon at the study's delta (zCDP accounting)",
            self.research_epsilon_spent.clone(),
        );
        r.register(
            "research_patients_contributing",
            "Patients who contributed to at least one released window of a study",
            self.research_patients_contributing.clone(),
        );
        r.register(
            "research_rows_read",
            "Rows a researcher read from a study over Flight",
            self.research_rows_read.clone(),
        );
        r.register(
            "research_batches_read",
            "Record batches a researcher read from a study over Flight",
            self.research_batches_read.clone(),
        );
        r.register(
            "research_bytes_read",
            "Bytes of Flight data a researcher read from a study",
            self.research_bytes_read.clone(),
        );
        r.register(
            "readings_stored",
            "Readings written to the store",
            self.readings_stored.clone(),
        );
        r.register(
            "dead_letters_stored",
            "Dead letters written to the store",
            self.dead_letters_stored.clone(),
        );
        r.register(
            "storage_files_written",
            "Parquet and state files written",
            self.storage_files_written.clone(),
        );
        r.register(
            "storage_bytes_written",
            "Bytes of Parquet written",
            self.storage_bytes_written.clone(),
        );
        r.register(
            "storage_flush_seconds",
            "Time to write one worker's flush",
            self.storage_flush_seconds.clone(),
        );
        r.register(
            "storage_errors",
            "Failed storage writes (retried)",
            self.storage_errors.clone(),
        );
        r.register(
            "storage_pending_readings",
            "Readings buffered for the next flush",
            self.storage_pending_readings.clone(),
        );
        r.register(
            "compaction_files_merged",
            "Small files merged by compaction",
            self.compaction_files_merged.clone(),
        );
        r.register(
            "retention_partitions_dropped",
            "Expired hour partitions dropped (one per table, hour and process)",
            self.retention_partitions_dropped.clone(),
        );
        r.register(
            "retention_rows_dropped",
            "Rows in expired partitions dropped",
            self.retention_rows_dropped.clone(),
        );
        r.register(
            "checkpoint_epoch_ms",
            "Storage checkpoint: every publish logged before this time (ms since epoch) is stored",
            self.checkpoint_epoch_ms.clone(),
        );
        r.register(
            "dataflow_lag_ms",
            "How far the stored frontier trails the wall clock",
            self.dataflow_lag_ms.clone(),
        );
        r.register(
            "dataflow_workers",
            "Timely workers in this process",
            self.dataflow_workers.clone(),
        );
        r.register_collector(Box::new(QuestDbCollector(self.questdb.clone())));
    }
}

/// The QuestDB sink's state, read on each scrape.
#[derive(Debug)]
struct QuestDbCollector(Arc<SinkStats>);

impl Collector for QuestDbCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rows = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "questdb_rows_sent",
            "Rows the QuestDB receiver accepted, by table",
            None,
            rows.metric_type(),
        )?;
        for (table, n) in [
            ("readings", get(&s.readings_sent)),
            ("alerts", get(&s.alerts_sent)),
            ("deadletters", get(&s.dead_letters_sent)),
        ] {
            ConstCounter::new(n).encode(family.encode_family(&[("table", table)])?)?;
        }
        for (name, help, n) in [
            (
                "questdb_requests",
                "Requests (batches) the QuestDB receiver accepted",
                get(&s.batches_sent),
            ),
            (
                "questdb_send_errors",
                "Failed sends to the QuestDB receiver (the rows went to the spool)",
                get(&s.send_errors),
            ),
            (
                "questdb_rows_spooled",
                "Rows written to the QuestDB spool while the receiver was down or slow",
                get(&s.rows_spooled),
            ),
            (
                "questdb_rows_drained",
                "Spooled rows the QuestDB receiver has since accepted",
                get(&s.rows_drained),
            ),
            (
                "questdb_spool_refusals",
                "Batches the full spool refused (kept in the write-ahead log and retried)",
                get(&s.spool_full),
            ),
        ] {
            let c = ConstCounter::new(n);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        for (name, help, n) in [
            (
                "questdb_spool_files",
                "Batches waiting in the QuestDB spool",
                get(&s.spool_files) as i64,
            ),
            (
                "questdb_spool_bytes",
                "Bytes in the QuestDB spool",
                get(&s.spool_bytes) as i64,
            ),
            (
                "questdb_spool_rows",
                "Rows waiting in the QuestDB spool",
                get(&s.spool_rows) as i64,
            ),
            (
                "questdb_receiver_up",
                "1 while the QuestDB receiver takes requests, 0 after a failure until one succeeds",
                get(&s.receiver_up) as i64,
            ),
        ] {
            let g = ConstGauge::new(n);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let age = ConstGauge::new(s.oldest_spooled_age_s());
        age.encode(encoder.encode_descriptor(
            "questdb_spool_oldest_age_seconds",
            "How long the oldest batch in the QuestDB spool has waited (0 when it is empty)",
            None,
            age.metric_type(),
        )?)
    }
}

/// Progress the dataflow reports to the node.
#[derive(Default)]
pub struct Progress {
    /// Every publish logged before this epoch is stored (global frontier).
    pub stored_frontier: AtomicU64,
    /// Every process has checkpointed up to here: the log may forget before it.
    pub truncate_below: AtomicU64,
    /// The latest checkpoint written by this process.
    pub checkpoint: AtomicU64,
    /// False while a storage write keeps failing.
    pub storage_healthy: AtomicBool,
}

impl Progress {
    pub fn new() -> Self {
        Self {
            storage_healthy: AtomicBool::new(true),
            ..Self::default()
        }
    }

    pub fn stored_frontier(&self) -> u64 {
        self.stored_frontier.load(Ordering::Acquire)
    }
}

/// Everything `/metrics` serves.
pub struct Metrics {
    pub ingest: Arc<IngestMetrics>,
    pub engine: Arc<EngineMetrics>,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let ingest = Arc::new(IngestMetrics::default());
        let engine = Arc::new(EngineMetrics::default());
        let mut registry = Registry::with_prefix("wardflow");
        ingest.register(&mut registry);
        engine.register(&mut registry);
        Arc::new(Metrics {
            ingest,
            engine,
            registry,
        })
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}
