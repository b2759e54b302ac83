//! The sealing stage: the process's ledger thread.
//!
//! Flush threads send the leaves of every row they wrote (computed from
//! the record batches as written), tagged with the row's dataflow epoch.
//! The ledger thread seals each whole anchor interval once the stored
//! frontier passes it (every worker's rows of it are then written), and
//! anchors the batch. The frontier is read after the leaves: the flush that
//! sent them happened before the frontier moved past their epoch, so every
//! leaf below a frontier the thread has read is already in its channel.
//!
//! After a restart, the leaves between the last sealed batch and the
//! storage checkpoint are read back from the files (the log replays only
//! from the checkpoint), and the log's new epochs start at or after the
//! last batch's end, so no leaf falls into a sealed range.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use wardflow_ledger_bridge::chain::{self, ChainAnchorer, ChainConfig, ChainStatus};
use wardflow_ledger_bridge::events::{
    AlertLogReader, EventLog, EventRecord, RequestTail, event_log_path, read_events,
};
use wardflow_ledger_bridge::{AnchorLog, Hash, LocalLedger, anchor_log_path};

use crate::config::Config;
use crate::metrics::{EngineMetrics, Progress};

/// Leaves that do not come from the store, on a channel of their own
/// (the alert thread must never wait for the ledger).
pub enum LedgerEvent {
    /// Lines just appended to the process's alert log: (byte offset,
    /// line without its break).
    AlertLines(Vec<(u64, Vec<u8>)>),
    /// An access to a patient's data inside the engine (alert delivery).
    Access(wardflow_ledger_bridge::events::AccessRequest),
}

/// What the ledger thread receives.
pub enum LedgerMsg {
    /// Leaves of rows written, with their epochs.
    Leaves(Vec<(u64, Hash)>),
    /// The dataflow finished and flushed everything: seal what is left.
    Finish,
}

/// The process's ledger, before its thread starts.
pub struct Ledger {
    ledger: LocalLedger,
    tx: Sender<LedgerMsg>,
    rx: Receiver<LedgerMsg>,
    /// With a chain configured: how to reach it, and what is not on it yet.
    chain: Option<(ChainConfig, Vec<wardflow_ledger_bridge::Anchor>)>,
    events: EventLog,
    event_tx: Sender<LedgerEvent>,
    event_rx: Receiver<LedgerEvent>,
}

/// Leaves in flight to the ledger thread, in messages (one per flush):
/// when sealing falls behind, flushes wait, and ingest slows through the
/// memory budget rather than leaves piling up.
const CHANNEL: usize = 16;

impl Ledger {
    /// Opens this process's ledger, if the configuration keeps one.
    pub fn open(config: &Config) -> anyhow::Result<Option<Ledger>> {
        if !config.ledger.enabled {
            return Ok(None);
        }
        let ledger = LocalLedger::open(
            config.dataflow.process as u32,
            &config.ledger_dir(),
            &config.ledger_key_file(),
            config.ledger.anchor_interval_ms,
        )
        .context("opening the ledger")?;
        let (tx, rx) = crossbeam_channel::bounded(CHANNEL);
        let chain = match &config.ledger.url {
            None => None,
            Some(url) => {
                let suri = config.ledger_suri()?;
                let signer = chain::load_signer(&suri)
                    .map_err(|e| anyhow::anyhow!("the ledger's chain account: {e}"))?;
                let process = config.dataflow.process as u32;
                let dir = config.ledger_dir();
                let anchors = AnchorLog::read(&anchor_log_path(&dir, process), None)?;
                let receipts = chain::read_receipts(&chain::receipt_log_path(&dir, process))?;
                let backlog = chain::backlog(&anchors, &receipts);
                tracing::info!(
                    %url,
                    account = %chain::hex(&signer.public_key().0),
                    backlog = backlog.len(),
                    "ledger: anchoring on a chain"
                );
                Some((
                    ChainConfig {
                        url: url.clone(),
                        signer,
                        timeout: Duration::from_secs(config.ledger.finality_timeout_s.max(1)),
                    },
                    backlog,
                ))
            }
        };
        let events = EventLog::open(&event_log_path(
            &config.ledger_dir(),
            config.dataflow.process as u32,
        ))?;
        let (event_tx, event_rx) = crossbeam_channel::unbounded();
        Ok(Some(Ledger {
            ledger,
            tx,
            rx,
            chain,
            events,
            event_tx,
            event_rx,
        }))
    }

    /// Where the alert thread reports the lines it logged.
    pub fn event_sender(&self) -> Sender<LedgerEvent> {
        self.event_tx.clone()
    }

    /// Where flushes send their leaves.
    pub fn sender(&self) -> Sender<LedgerMsg> {
        self.tx.clone()
    }

    /// The epoch the write-ahead log's new commits must not fall below.
    pub fn min_epoch(&self) -> u64 {
        self.ledger.sealed_to().unwrap_or(0)
    }

    /// Reads back the leaves of rows stored between the last sealed batch
    /// and `checkpoint` (the log replays the rest), then starts sealing.
    pub fn start(
        mut self,
        config: &Config,
        checkpoint: u64,
        progress: Arc<Progress>,
        metrics: Arc<EngineMetrics>,
    ) -> anyhow::Result<LedgerThread> {
        let from = self
            .ledger
            .resume_point(checkpoint)
            .context("recording where the ledger begins")?;
        if from < checkpoint {
            let started = Instant::now();
            let mut leaves = Vec::new();
            wardflow_storage::leaves::stored_leaves(
                &config.data_dir,
                config.dataflow.process,
                from..checkpoint,
                config.storage.flush_interval_ms,
                &mut leaves,
            )
            .context("reading back the leaves of rows stored but not yet sealed")?;
            tracing::info!(
                leaves = leaves.len(),
                from,
                to = checkpoint,
                ms = started.elapsed().as_millis() as u64,
                "ledger: leaves read back from the store"
            );
            self.ledger.add_tagged(leaves);
        }
        // Events recorded but not sealed before the stop.
        let process = config.dataflow.process as u32;
        let mut alert_log = AlertLogReader::open(&crate::alerting::log_path(
            &config.data_dir,
            config.dataflow.process,
        ));
        let recorded = read_events(&event_log_path(&config.ledger_dir(), process))?;
        let unsealed: Vec<(u64, Hash)> = recorded
            .iter()
            .filter(|r| r.epoch() >= from)
            .map(|r| (r.epoch(), r.leaf(&mut alert_log)))
            .collect();
        self.ledger.add_tagged(unsealed);
        // Process 0 records the access requests of tools outside the engine.
        let requests = (process == 0).then(|| {
            let ids = recorded
                .iter()
                .filter_map(|r| match r {
                    EventRecord::Access { request, .. } if !request.is_empty() => {
                        Some(request.clone())
                    }
                    _ => None,
                })
                .collect();
            (RequestTail::new(&config.ledger_dir()), ids)
        });
        let Ledger {
            ledger,
            tx,
            rx,
            chain,
            events,
            event_tx,
            event_rx,
        } = self;
        drop(event_tx);
        let anchorer = match chain {
            Some((c, backlog)) => Some(ChainAnchorer::start(
                c,
                config.dataflow.process as u32,
                &config.ledger_dir(),
                backlog,
            )?),
            None => None,
        };
        let chain_status = anchorer.as_ref().map(|a| a.status.clone());
        let tx_finish = tx.clone();
        drop(tx);
        let join = std::thread::Builder::new()
            .name("ledger".into())
            .spawn(move || {
                // Hashing and sealing can wait; alerts cannot.
                wardflow_ingest::priority::lower_current_thread(
                    wardflow_ingest::priority::BackgroundIo::Lowest,
                );
                run(
                    ledger,
                    Events {
                        log: events,
                        rx: event_rx,
                        requests,
                    },
                    anchorer,
                    rx,
                    progress,
                    metrics,
                )
            })?;
        Ok(LedgerThread {
            tx: tx_finish,
            join,
            chain_status,
        })
    }
}

/// The running ledger thread.
pub struct LedgerThread {
    tx: Sender<LedgerMsg>,
    join: JoinHandle<()>,
    chain_status: Option<Arc<ChainStatus>>,
}

impl LedgerThread {
    /// The chain anchorer's progress, when anchoring on a chain.
    pub fn chain_status(&self) -> Option<Arc<ChainStatus>> {
        self.chain_status.clone()
    }

    /// Ends the thread. After a clean finish of the dataflow (`all_stored`),
    /// every pending leaf is sealed; otherwise only what lies below the
    /// stored frontier, and the rest after a restart.
    pub fn finish(self, all_stored: bool) {
        if all_stored {
            let _ = self.tx.send(LedgerMsg::Finish);
        }
        drop(self.tx);
        let _ = self.join.join();
    }
}

/// The event log and what feeds it.
struct Events {
    log: EventLog,
    rx: Receiver<LedgerEvent>,
    /// The access requests file and the requests already recorded.
    requests: Option<(RequestTail, std::collections::HashSet<String>)>,
}

impl Events {
    /// Gives each event an epoch still open, records it, and adds its leaf.
    fn take(&mut self, ledger: &mut LocalLedger, frontier: u64) -> Result<(), String> {
        let epoch = frontier.max(ledger.open_from());
        let mut records = Vec::new();
        let mut leaves = Vec::new();
        let mut buf = Vec::new();
        while let Ok(e) = self.rx.try_recv() {
            match e {
                LedgerEvent::AlertLines(lines) => {
                    for (offset, line) in lines {
                        buf.clear();
                        wardflow_ledger_bridge::leaf::AlertTransitionLeaf { log_line: &line }
                            .encode(&mut buf);
                        leaves.push((epoch, wardflow_ledger_bridge::leaf_hash(&buf)));
                        records.push(EventRecord::Alert {
                            epoch,
                            offset,
                            len: line.len() as u32,
                        });
                    }
                }
                LedgerEvent::Access(a) => {
                    let record = a.record(epoch);
                    leaves.push((epoch, record.leaf(&mut AlertLogReader::none())));
                    records.push(record);
                }
            }
        }
        if let Some((tail, seen)) = &mut self.requests {
            for r in tail.poll() {
                if seen.insert(r.id.clone()) {
                    let record = r.record(epoch);
                    leaves.push((epoch, record.leaf(&mut AlertLogReader::none())));
                    records.push(record);
                }
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        self.log.append(&records).map_err(|e| e.to_string())?;
        ledger.add_tagged(leaves);
        Ok(())
    }
}

fn run(
    mut ledger: LocalLedger,
    mut events: Events,
    anchorer: Option<ChainAnchorer>,
    rx: Receiver<LedgerMsg>,
    progress: Arc<Progress>,
    metrics: Arc<EngineMetrics>,
) {
    let mut retry_at: Option<Instant> = None;
    loop {
        let msg = rx.recv_timeout(Duration::from_millis(100));
        // The frontier first, then everything already sent.
        let frontier = progress.stored_frontier();
        let mut finish = false;
        let mut take = |m: LedgerMsg, ledger: &mut LocalLedger| match m {
            LedgerMsg::Leaves(l) => {
                metrics.ledger_leaves.inc_by(l.len() as u64);
                ledger.add_tagged(l);
            }
            LedgerMsg::Finish => finish = true,
        };
        match msg {
            Ok(m) => take(m, &mut ledger),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        while let Ok(m) = rx.try_recv() {
            take(m, &mut ledger);
        }
        if let Err(e) = events.take(&mut ledger, frontier) {
            tracing::error!("ledger: recording alert transitions and accesses failed: {e}");
            metrics.ledger_errors.inc();
        }
        let watermark = if finish { u64::MAX } else { frontier };
        if retry_at.is_none_or(|t| Instant::now() >= t) || finish {
            retry_at = None;
            let started = Instant::now();
            // The event log is durable before any batch holding it is anchored.
            let sealed = events
                .log
                .sync()
                .and_then(|()| ledger.seal_until(watermark));
            match sealed {
                Ok(anchors) => {
                    if let Some(a) = &anchorer {
                        for anchor in &anchors {
                            a.submit(anchor.clone());
                        }
                    }
                    if !anchors.is_empty() {
                        metrics
                            .ledger_seal_seconds
                            .observe(started.elapsed().as_secs_f64());
                    }
                    metrics.ledger_batches.inc_by(anchors.len() as u64);
                    if let Some(to) = ledger.sealed_to() {
                        metrics.ledger_sealed_to_ms.set(to as i64);
                    }
                }
                Err(e) => {
                    tracing::error!("ledger: anchoring failed, retrying in 1 s: {e}");
                    metrics.ledger_errors.inc();
                    retry_at = Some(Instant::now() + Duration::from_secs(1));
                }
            }
        }
        metrics
            .ledger_pending_leaves
            .set(ledger.pending_leaves() as i64);
        if finish {
            break;
        }
    }
    if let Some(a) = anchorer {
        a.stop();
    }
}
