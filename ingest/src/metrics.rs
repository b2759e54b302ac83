//! Ingest's Prometheus metrics. The engine registers them under the
//! `wardflow_` prefix and serves them on `/metrics`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use wardflow_model::RejectReason;

use crate::priority::AlertPathScheduling;
use crate::validate::ValidationCounts;

type Labels = [(&'static str, &'static str); 1];

pub struct IngestMetrics {
    pub connections: Gauge,
    pub clinician_connections: Gauge,
    pub admission_reserve: Counter,
    pub connects: Family<Labels, Counter>,
    pub session_takeovers: Counter,
    pub publishes: Family<Labels, Counter>,
    pub publish_bytes: Counter,
    pub publishes_refused: Family<Labels, Counter>,
    pub readings_accepted: Counter,
    pub readings_rejected: Family<Labels, Counter>,
    pub readings_duplicate: Counter,
    pub readings_sequence_gap: Counter,
    pub sequence_resets: Counter,
    pub wal_fsync_seconds: Histogram,
    pub publish_durable_seconds: Histogram,
    pub wal_bytes: Counter,
    pub wal_commits: Counter,
    pub wal_records: Counter,
    pub wal_replayed: Counter,
    pub wal_segments: Gauge,
    pub wal_segments_deleted: Counter,
    pub wal_segments_prepared: Counter,
    pub wal_segments_unprepared: Counter,
    pub wal_failed: Gauge,
    pub memory_budget_bytes: Gauge,
    pub memory_in_flight_bytes: Gauge,
    pub backpressure_waits: Gauge,
    /// Threads on the alert path, by the scheduling the kernel granted.
    pub alert_path_threads: Family<Labels, Gauge>,
}

impl Default for IngestMetrics {
    fn default() -> Self {
        Self {
            connections: Gauge::default(),
            clinician_connections: Gauge::default(),
            admission_reserve: Counter::default(),
            connects: Family::default(),
            session_takeovers: Counter::default(),
            publishes: Family::default(),
            publish_bytes: Counter::default(),
            publishes_refused: Family::default(),
            readings_accepted: Counter::default(),
            readings_rejected: Family::default(),
            readings_duplicate: Counter::default(),
            readings_sequence_gap: Counter::default(),
            sequence_resets: Counter::default(),
            // 50 µs .. ~1.6 s
            wal_fsync_seconds: Histogram::new(exponential_buckets(50e-6, 2.0, 16)),
            publish_durable_seconds: Histogram::new(exponential_buckets(50e-6, 2.0, 16)),
            wal_bytes: Counter::default(),
            wal_commits: Counter::default(),
            wal_records: Counter::default(),
            wal_replayed: Counter::default(),
            wal_segments: Gauge::default(),
            wal_segments_deleted: Counter::default(),
            wal_segments_prepared: Counter::default(),
            wal_segments_unprepared: Counter::default(),
            wal_failed: Gauge::default(),
            memory_budget_bytes: Gauge::default(),
            memory_in_flight_bytes: Gauge::default(),
            backpressure_waits: Gauge::default(),
            alert_path_threads: Family::default(),
        }
    }
}

impl IngestMetrics {
    /// Adds one validation round's counts.
    pub fn record_validation(&self, c: &ValidationCounts) {
        if c.accepted > 0 {
            self.readings_accepted.inc_by(c.accepted);
        }
        for (reason, n) in RejectReason::ALL.iter().zip(c.rejected) {
            if n > 0 {
                self.readings_rejected
                    .get_or_create(&[("reason", reason.code())])
                    .inc_by(n);
            }
        }
        if c.duplicates > 0 {
            self.readings_duplicate.inc_by(c.duplicates);
        }
        if c.gap_readings > 0 {
            self.readings_sequence_gap.inc_by(c.gap_readings);
        }
        if c.seq_resets > 0 {
            self.sequence_resets.inc_by(c.seq_resets);
        }
    }

    /// Schedules the calling thread as one on the alert path and counts
    /// what the kernel granted it.
    pub fn enter_alert_path(&self, wanted: AlertPathScheduling) {
        let got = crate::priority::alert_path_current_thread(wanted);
        self.alert_path_threads
            .get_or_create(&[("scheduling", got.name())])
            .inc();
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "mqtt_connections",
            "Open device connections",
            self.connections.clone(),
        );
        r.register(
            "mqtt_admission_reserve",
            "Readiness checks that used the memory budget's reserve because a payload was arriving in chunks",
            self.admission_reserve.clone(),
        );
        r.register(
            "mqtt_clinician_connections",
            "Open clinician connections (alert feeds)",
            self.clinician_connections.clone(),
        );
        r.register(
            "mqtt_connects",
            "CONNECT attempts by result",
            self.connects.clone(),
        );
        r.register(
            "mqtt_session_takeovers",
            "Connections closed because their device connected again",
            self.session_takeovers.clone(),
        );
        r.register(
            "mqtt_publishes",
            "PUBLISH packets accepted, by QoS",
            self.publishes.clone(),
        );
        r.register(
            "mqtt_publish_bytes",
            "Payload bytes accepted",
            self.publish_bytes.clone(),
        );
        r.register(
            "mqtt_publishes_refused",
            "PUBLISH packets refused, by reason (topic, removed_device, log_failed)",
            self.publishes_refused.clone(),
        );
        r.register(
            "readings_accepted",
            "Readings validated and stored",
            self.readings_accepted.clone(),
        );
        r.register(
            "readings_rejected",
            "Readings sent to dead letters, by reason",
            self.readings_rejected.clone(),
        );
        r.register(
            "readings_duplicate",
            "Resent readings dropped because they were already stored",
            self.readings_duplicate.clone(),
        );
        r.register(
            "readings_sequence_gap",
            "Readings missing from device sequence numbering (never received)",
            self.readings_sequence_gap.clone(),
        );
        r.register(
            "device_sequence_resets",
            "Devices that restarted their sequence numbering",
            self.sequence_resets.clone(),
        );
        r.register(
            "wal_fsync_seconds",
            "Write-ahead log group-commit fsync latency",
            self.wal_fsync_seconds.clone(),
        );
        r.register(
            "publish_durable_seconds",
            "From a QoS 1 publish's receipt to its durability in the write-ahead log (its PUBACK)",
            self.publish_durable_seconds.clone(),
        );
        r.register(
            "wal_bytes",
            "Bytes appended to the write-ahead log",
            self.wal_bytes.clone(),
        );
        r.register(
            "wal_commits",
            "Write-ahead log group commits",
            self.wal_commits.clone(),
        );
        r.register(
            "wal_records",
            "Publishes appended to the write-ahead log",
            self.wal_records.clone(),
        );
        r.register(
            "wal_replayed",
            "Publishes replayed from the write-ahead log on start",
            self.wal_replayed.clone(),
        );
        r.register(
            "wal_segments",
            "Write-ahead log segment files",
            self.wal_segments.clone(),
        );
        r.register(
            "wal_segments_deleted",
            "Write-ahead log segments deleted after the storage checkpoint passed them",
            self.wal_segments_deleted.clone(),
        );
        r.register(
            "wal_segments_prepared",
            "Write-ahead log segments prepared ahead of the writer (allocated, zeroed and fsynced)",
            self.wal_segments_prepared.clone(),
        );
        r.register(
            "wal_segments_unprepared",
            "Write-ahead log segments the writer had to create itself because no prepared one was ready",
            self.wal_segments_unprepared.clone(),
        );
        r.register(
            "wal_failed",
            "1 if the write-ahead log stopped after an I/O error",
            self.wal_failed.clone(),
        );
        r.register(
            "memory_budget_bytes",
            "Cap on payload bytes in flight between sockets and storage",
            self.memory_budget_bytes.clone(),
        );
        r.register(
            "memory_in_flight_bytes",
            "Payload bytes in flight between sockets and storage",
            self.memory_in_flight_bytes.clone(),
        );
        r.register(
            "backpressure_waits",
            "Publishes that waited for memory budget (senders slowed)",
            self.backpressure_waits.clone(),
        );
        r.register(
            "alert_path_threads",
            "Threads on a publish's way to its alert (MQTT workers, log writer, dataflow workers, alert thread), by the scheduling the kernel granted: realtime, short-slice or normal",
            self.alert_path_threads.clone(),
        );
    }
}
