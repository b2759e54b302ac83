//! A running Wardflow node: the pieces of `wardflow serve`, started and
//! stopped in the order that keeps every acknowledged reading.
//!
//! Start: registry → dataflow workers (which agree on the checkpoint and
//! recover the store) → write-ahead log (replaying from the checkpoint) →
//! MQTT and HTTP listeners → housekeeping (log truncation, compaction,
//! gauges). Stop runs the other way: listeners first, so no new publish is
//! accepted; then the log drains into the dataflow, which flushes everything
//! and writes its last checkpoint.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ntex::web::{self, App, HttpResponse};
use parking_lot::Mutex;
use wardflow_ingest::budget::MemoryBudget;
use wardflow_ingest::census::CensusWatcher;
use wardflow_ingest::feeds::{AlertHub, Commands};
use wardflow_ingest::registry::RegistryWatcher;
use wardflow_ingest::server::{IngestContext, mqtt_config, mqtt_service};
use wardflow_ingest::wal::{Shards, Wal, WalConfig, WalControl};
use wardflow_storage::checkpoint::consolidate_states;
use wardflow_storage::compact::{CompactionPolicy, Compactor};

use crate::alerting::{self, AlertContext, RuleBook};
use crate::config::Config;
use crate::dataflow::{DataflowContext, run_worker};
use crate::metrics::{Metrics, Progress};

/// A started node.
pub struct Node {
    pub metrics: Arc<Metrics>,
    pub progress: Arc<Progress>,
    pub mqtt_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub data_dir: PathBuf,
    net: Option<NetThread>,
    wal: Option<Wal>,
    timely: Option<timely::communication::WorkerGuards<()>>,
    housekeeping: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    alert_thread: Option<JoinHandle<()>>,
    questdb: Option<wardflow_storage::questdb::QuestDbSink>,
    ledger: Option<crate::ledger::LedgerThread>,
    consent: Option<wardflow_ledger_bridge::follow::ConsentFollower>,
    emergency: Option<JoinHandle<()>>,
    /// The Arrow Flight server for research studies, if it runs here.
    pub flight_addr: Option<SocketAddr>,
    flight: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

struct NetThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: JoinHandle<()>,
}

fn bind(what: &str, addr: &str) -> anyhow::Result<TcpListener> {
    let l =
        TcpListener::bind(addr).with_context(|| format!("cannot listen for {what} on {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn timely_config(config: &Config) -> anyhow::Result<timely::Config> {
    let workers = config.workers();
    let d = &config.dataflow;
    let communication = if d.processes <= 1 {
        timely::CommunicationConfig::Process(workers)
    } else {
        let addresses = match &d.hostfile {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading hostfile {}", path.display()))?;
                let hosts: Vec<String> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string)
                    .collect();
                if hosts.len() != d.processes {
                    bail!(
                        "{}: lists {} hosts but dataflow.processes is {}",
                        path.display(),
                        hosts.len(),
                        d.processes
                    );
                }
                hosts
            }
            None => (0..d.processes)
                .map(|i| format!("127.0.0.1:{}", 2101 + i))
                .collect(),
        };
        timely::CommunicationConfig::Cluster {
            threads: workers,
            process: d.process,
            addresses,
            report: false,
            zerocopy: false,
        }
    };
    Ok(timely::Config {
        communication,
        worker: timely::WorkerConfig::default(),
    })
}

impl Node {
    /// Starts a node; returns once it accepts connections.
    pub fn start(config: &Config) -> anyhow::Result<Node> {
        config.validate()?;
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating data directory {}", data_dir.display()))?;
        // Bind first: a taken port is the most common start failure.
        let mqtt_listener = bind("MQTT", &config.mqtt.listen)?;
        let http_listener = bind("HTTP", &config.http.listen)?;
        let (mqtt_addr, http_addr) = (mqtt_listener.local_addr()?, http_listener.local_addr()?);

        let keys = config.keyring()?;
        let registry = RegistryWatcher::open(&data_dir)?;
        registry.spawn_poller(Duration::from_millis(500));
        let census = CensusWatcher::open(&data_dir)?;
        census.spawn_pollers(Duration::from_millis(500));
        let rules = RuleBook::open(config.rules.dir.as_deref())
            .map_err(|e| anyhow::anyhow!("alert rules: {e}"))?;
        rules.spawn_poller(Duration::from_millis(config.rules.reload_ms.max(100)));
        let metrics = Metrics::new();
        let progress = Arc::new(Progress::new());
        let budget = MemoryBudget::new(config.in_flight_budget());
        metrics
            .ingest
            .memory_budget_bytes
            .set(budget.capacity() as i64);

        // The dataflow.
        let workers = config.workers();
        metrics.engine.dataflow_workers.set(workers as i64);
        let (shards, sources) = Shards::new(workers);
        let (commands, command_rx) = Commands::new(sources[0].wake.clone());
        let hub = AlertHub::new();
        let board = crate::board::Board::new();
        let restored = alerting::latest(alerting::read_log(&data_dir)?);
        alerting::publish_restored(&hub, &restored);
        // The ledger: the log must know where sealed epochs end, and the
        // alert thread reports the transitions it logs to it.
        let ledger = crate::ledger::Ledger::open(config)?;
        // Every alert about a patient handed to a clinician is an access to
        // the patient's data, recorded in the audit trail.
        if let Some(events) = ledger.as_ref().map(|l| l.event_sender()) {
            hub.on_delivery(Arc::new(move |item, who| {
                if let Some(patient) = &item.patient {
                    // In the admitting unit, care is the purpose; outside it,
                    // the consent it was sent under says which, and its version.
                    let (purpose, under) = match &item.grant {
                        Some(g) => (g.purpose.as_str(), format!(" under consent {}", g.version)),
                        None if who.starts_with("admin/") => ("administration", String::new()),
                        None => ("treatment", String::new()),
                    };
                    let access = wardflow_ledger_bridge::events::AccessRequest::new(
                        wardflow_model::now_ns(),
                        patient,
                        // Clinicians subscribe by id, a console's other
                        // readers by `role/id` ('/' is in no id).
                        &match who.split_once('/') {
                            Some((role, id)) => format!("{role}:{id}"),
                            None => format!("clinician:{who}"),
                        },
                        "alert-delivery",
                        purpose,
                        &format!("alert {} transition {}{under}", item.id, item.seq),
                    );
                    let _ = events.send(crate::ledger::LedgerEvent::Access(access));
                }
            }));
        }
        let (alert_tx, alert_rx) = crossbeam_channel::unbounded();
        let (consent_tx, consent_rx) = crossbeam_channel::unbounded();
        // The console reads the accesses in force from the same changes.
        let access = Arc::new(crate::console::AccessView::default());
        let consent_rx = access.tee(consent_rx)?;
        let console_events = ledger.as_ref().map(|l| l.event_sender());
        // Consent records on the chain (or the local consent log): process
        // 0 reads them for the cluster.
        let consent = match &ledger {
            Some(l) if config.dataflow.process == 0 => Some(
                crate::consent::start_follower(
                    config,
                    config.ledger.url.as_deref(),
                    consent_tx.clone(),
                    l.event_sender(),
                )
                .context("following consent records")?,
            ),
            _ => None,
        };
        // The QuestDB sink, when storage.backend names it: flushes and the
        // alert thread hand it their rows; it stops after both.
        let questdb = match config.questdb_sink() {
            Some(sink) => Some(
                wardflow_storage::questdb::QuestDbSink::start(sink, metrics.engine.questdb.clone())
                    .context("starting the QuestDB sink")?,
            ),
            None => None,
        };
        let alert_thread = alerting::spawn_alert_thread(
            alert_rx,
            hub.clone(),
            alerting::log_path(&data_dir, config.dataflow.process),
            metrics.clone(),
            config.scheduling.alert_path,
            ledger.as_ref().map(|l| l.event_sender()),
            questdb.as_ref().map(|q| q.handle()),
        )?;
        let alerts = Arc::new(AlertContext {
            rules: rules.clone(),
            census: census.clone(),
            registry: registry.clone(),
            out: alert_tx,
            restored,
            board: board.clone(),
        });
        // Research studies: every process sums its readings per window;
        // process 0 releases them and serves them over Flight.
        let studies = wardflow_research::store::Registry::open(&data_dir);
        studies.spawn_poller(Duration::from_secs(1));
        let research = crate::research::ResearchContext::new(
            studies.clone(),
            census.clone(),
            config.dataflow.process == 0,
        )?;
        let (recovered_tx, recovered_rx) = crossbeam_channel::bounded(1);
        let ctx = Arc::new(DataflowContext {
            root: data_dir.clone(),
            process: config.dataflow.process,
            workers_per_process: workers,
            interval_ms: config.storage.flush_interval_ms,
            validation: config.validation_config(),
            sources: Mutex::new(sources.into_iter().map(Some).collect()),
            recovered: Mutex::new(Some(recovered_tx)),
            ingest_metrics: metrics.ingest.clone(),
            metrics: metrics.engine.clone(),
            progress: progress.clone(),
            alerts,
            commands: Mutex::new(Some(command_rx)),
            ledger: ledger.as_ref().map(|l| l.sender()),
            consents: Mutex::new(Some(consent_rx)),
            research: Some(research),
            keys: keys.clone(),
            questdb: questdb.as_ref().map(|q| q.handle()),
            embedded: config.storage.backend.embedded(),
            budget: budget.clone(),
        });
        let guards = timely::execute(timely_config(config)?, {
            let ctx = ctx.clone();
            let scheduling = config.scheduling.alert_path;
            move |worker| {
                ctx.ingest_metrics.enter_alert_path(scheduling);
                run_worker(worker, &ctx)
            }
        })
        .map_err(|e| anyhow::anyhow!("starting the dataflow: {e}"))?;
        let checkpoint = recovered_rx
            .recv()
            .context("the dataflow stopped before recovering the store")??;

        // The log, replaying from the checkpoint.
        let wal_dir = data_dir
            .join("wal")
            .join(format!("p{}", config.dataflow.process));
        let mut wal_config = WalConfig::new(wal_dir);
        wal_config.segment_bytes = config.wal.segment_mb << 20;
        wal_config.scheduling = config.scheduling.alert_path;
        // No new publish may fall into an epoch range already sealed.
        wal_config.min_epoch = ledger.as_ref().map_or(0, |l| l.min_epoch());
        // The log holds payloads in the clear: with encryption at rest, what
        // was logged before this start goes once it is stored.
        wal_config.fresh_segment_on_start = keys.is_some();
        let ledger = match ledger {
            Some(l) => {
                Some(l.start(config, checkpoint, progress.clone(), metrics.engine.clone())?)
            }
            None => None,
        };
        let wal = Wal::start(
            wal_config,
            checkpoint,
            shards,
            budget.clone(),
            metrics.ingest.clone(),
        )?;

        // Listeners.
        let registry_watch = registry.clone();
        let ingest = Arc::new(IngestContext {
            registry,
            wal: wal.handle.clone(),
            budget: budget.clone(),
            metrics: metrics.ingest.clone(),
            sessions: Default::default(),
            census: census.clone(),
            hub: hub.clone(),
            commands: commands.clone(),
            data_dir: data_dir.clone(),
            patient_auth: Some({
                let ledger_dir = config.ledger_dir();
                Arc::new(move |patient: &str, password: &[u8]| {
                    crate::emergency::check_login(&ledger_dir, patient, password)
                })
            }),
        });
        let health = Arc::new(Health {
            metrics: metrics.clone(),
            progress: progress.clone(),
            wal: wal.handle.control(),
            budget: budget.clone(),
            rules: rules.clone(),
            chain: ledger.as_ref().and_then(|l| l.chain_status()),
            consent: consent.as_ref().map(|c| c.status.clone()),
            studies: studies.clone(),
        });
        let api = Arc::new(crate::api::Api {
            census: census.clone(),
            hub: hub.clone(),
            commands,
        });
        let console = Arc::new(crate::console::Console::new(
            config,
            census.clone(),
            registry_watch,
            hub.clone(),
            board.clone(),
            api.commands.clone(),
            access,
            keys.clone(),
            console_events,
        ));
        let net = start_net(
            config,
            mqtt_listener,
            http_listener,
            ingest,
            health,
            api,
            console,
        )?;

        // Housekeeping.
        let stop = Arc::new(AtomicBool::new(false));
        let hk = {
            let (stop, progress, metrics, handle) = (
                stop.clone(),
                progress.clone(),
                metrics.clone(),
                wal.handle.control(),
            );
            let root = data_dir.clone();
            let keys = keys.clone();
            let retention = config.retention();
            let process = config.dataflow.process;
            let policy = CompactionPolicy {
                min_files: config.storage.compaction_min_files,
                max_rows: config.storage.compaction_max_rows,
                large_rows: config.storage.compaction_large_rows,
            };
            std::thread::Builder::new()
                .name("housekeeping".into())
                .spawn(move || {
                    // Compaction rewrites Parquet: it runs behind ingest and alerts.
                    // Compaction can wait as long as it must.
                    wardflow_ingest::priority::lower_current_thread(
                        wardflow_ingest::priority::BackgroundIo::Idle,
                    );
                    housekeeping(
                        stop, progress, metrics, handle, budget, root, process, policy, keys,
                        retention,
                    )
                })?
        };
        // Break-glass access (process 0 opens it for the cluster).
        let emergency = if config.dataflow.process == 0 {
            Some(crate::emergency::spawn_watcher(
                config.ledger_dir(),
                hub.clone(),
                consent_tx,
                stop.clone(),
            )?)
        } else {
            None
        };
        let flight = if config.dataflow.process == 0 && !config.research.flight.is_empty() {
            let stop = Arc::new(AtomicBool::new(false));
            let (addr, join) = crate::research::start_flight(
                &config.research.flight,
                studies.clone(),
                &data_dir,
                stop.clone(),
            )?;
            tracing::info!(%addr, "research studies served over Arrow Flight");
            Some((addr, (stop, join)))
        } else {
            None
        };
        let flight_addr = flight.as_ref().map(|f| f.0);
        tracing::info!(%mqtt_addr, %http_addr, data_dir = %data_dir.display(), workers, checkpoint, "wardflow is serving");
        Ok(Node {
            metrics,
            progress,
            mqtt_addr,
            http_addr,
            data_dir,
            net: Some(net),
            wal: Some(wal),
            timely: Some(guards),
            housekeeping: Some((stop, hk)),
            alert_thread: Some(alert_thread),
            questdb,
            ledger,
            consent,
            emergency,
            flight_addr,
            flight: flight.map(|f| f.1),
        })
    }

    /// Stops accepting, stores everything accepted, and returns.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.consent.take() {
            c.stop();
        }
        if let Some((stop, join)) = self.flight.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = join.join();
        }
        if let Some(mut net) = self.net.take() {
            if let Some(tx) = net.stop.take() {
                let _ = tx.send(());
            }
            let _ = net.join.join();
        }
        if let Some(wal) = self.wal.take() {
            wal.shutdown();
        }
        let mut all_stored = true;
        if let Some(guards) = self.timely.take() {
            for r in guards.join() {
                if let Err(e) = r {
                    tracing::error!("a dataflow worker failed: {e}");
                    all_stored = false;
                }
            }
        }
        // The workers are gone, so the alert channel is closed: the alert
        // thread writes what is left and ends, then the ledger seals it.
        if let Some(join) = self.alert_thread.take() {
            let _ = join.join();
        }
        // Flushes and alerts are done: what the receiver has not taken
        // stays in the spool for the next start.
        if let Some(q) = self.questdb.take() {
            q.shutdown();
        }
        if let Some(ledger) = self.ledger.take() {
            ledger.finish(all_stored);
        }
        if let Some((stop, join)) = self.housekeeping.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = join.join();
        }
        if let Some(join) = self.emergency.take() {
            let _ = join.join();
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// What /healthz and /metrics read.
struct Health {
    metrics: Arc<Metrics>,
    progress: Arc<Progress>,
    wal: WalControl,
    budget: Arc<MemoryBudget>,
    rules: Arc<RuleBook>,
    chain: Option<Arc<wardflow_ledger_bridge::chain::ChainStatus>>,
    consent: Option<Arc<wardflow_ledger_bridge::follow::FollowStatus>>,
    studies: Arc<wardflow_research::store::Registry>,
}

/// Updates the gauges that are sampled rather than counted.
fn refresh_gauges(metrics: &Metrics, progress: &Progress, budget: &MemoryBudget) {
    let i = &metrics.ingest;
    i.memory_in_flight_bytes.set(budget.in_use() as i64);
    i.backpressure_waits.set(budget.waits() as i64);
    let stored = progress.stored_frontier();
    if stored > 0 {
        let now = (wardflow_model::now_ns() / 1_000_000) as i64;
        metrics
            .engine
            .dataflow_lag_ms
            .set((now - stored as i64).max(0));
    }
}

impl Health {
    fn refresh_gauges(&self) {
        refresh_gauges(&self.metrics, &self.progress, &self.budget);
        let e = &self.metrics.engine;
        e.rules_loaded
            .set(self.rules.snapshot().0.rules.len() as i64);
        e.rules_reload_failures
            .set(self.rules.reload_failures.load(Ordering::Relaxed) as i64);
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as i64;
        if let Some(c) = &self.consent {
            e.consent_last_block.set(get(&c.last_block));
            e.consent_records.set(get(&c.records));
            e.consent_refused.set(get(&c.refused));
            e.consent_errors.set(get(&c.errors));
        }
        for live in self.studies.all() {
            let study = live.study.id.clone();
            let state = live.state();
            e.research_windows_released
                .get_or_create(&[("study", study.clone())])
                .set(state.windows_released as i64);
            e.research_epsilon_spent
                .get_or_create(&[("study", study.clone())])
                .set(state.accountant.spent_epsilon(live.study.delta));
            e.research_patients_contributing
                .get_or_create(&[("study", study.clone())])
                .set(live.contributions().patients.len() as i64);
            for (who, u) in live.usage().readers {
                let labels = [("study", study.clone()), ("researcher", who)];
                e.research_rows_read
                    .get_or_create(&labels)
                    .set(u.rows as i64);
                e.research_batches_read
                    .get_or_create(&labels)
                    .set(u.batches as i64);
                e.research_bytes_read
                    .get_or_create(&labels)
                    .set(u.bytes as i64);
            }
        }
        if let Some(c) = &self.chain {
            e.ledger_chain_pending_batches.set(get(&c.pending_batches));
            e.ledger_chain_anchored_batches
                .set(get(&c.anchored_batches));
            e.ledger_chain_extrinsics.set(get(&c.extrinsics));
            e.ledger_chain_errors.set(get(&c.errors));
            e.ledger_chain_last_block.set(get(&c.last_block));
            e.ledger_chain_connected
                .set(c.connected.load(Ordering::Relaxed) as i64);
        }
    }

    fn report(&self) -> (bool, serde_json::Value) {
        self.refresh_gauges();
        let wal_ok = !self.wal.is_failed();
        let storage_ok = self.progress.storage_healthy.load(Ordering::Relaxed);
        let lag = self.metrics.engine.dataflow_lag_ms.get();
        let ok = wal_ok && storage_ok;
        (
            ok,
            serde_json::json!({
                "status": if ok { "ok" } else { "failing" },
                "write_ahead_log": if wal_ok { "ok" } else { "failed" },
                "storage": if storage_ok { "ok" } else { "failing" },
                "checkpoint_epoch_ms": self.progress.checkpoint.load(Ordering::Relaxed),
                "dataflow_lag_ms": lag,
                "memory_in_flight_bytes": self.budget.in_use(),
                "rules": self.rules.snapshot().0.rules.len(),
                "rules_error": self.rules.last_error.lock().clone(),
            }),
        )
    }
}

fn start_net(
    config: &Config,
    mqtt: TcpListener,
    http: TcpListener,
    ingest: Arc<IngestContext>,
    health: Arc<Health>,
    api: Arc<crate::api::Api>,
    console: Arc<crate::console::Console>,
) -> anyhow::Result<NetThread> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<std::io::Result<()>>(1);
    let limits = config.mqtt_limits();
    let io_threads = config.mqtt.io_threads;
    let scheduling = config.scheduling.alert_path;
    let join = std::thread::Builder::new()
        .name("net".into())
        .spawn(move || {
            ntex::rt::System::build()
                .name("wardflow-net")
                .build(ntex::rt::DefaultRuntime)
                .block_on(async move {
                    let started = (|| {
                        let mqtt = ntex::server::build()
                            .listen("mqtt", mqtt, async move |_| {
                                // Runs on each MQTT worker thread as it starts.
                                ingest.metrics.enter_alert_path(scheduling);
                                mqtt_service(ingest.clone())
                            })?
                            .config("mqtt", mqtt_config(&limits))
                            .workers(io_threads)
                            .disable_signals()
                            .run();
                        let http = web::HttpServer::new(async move || {
                            App::new()
                                .state(health.clone())
                                .state(api.clone())
                                .state(console.clone())
                                .route("/healthz", web::get().to(healthz))
                                .route("/metrics", web::get().to(metrics))
                                .configure(crate::api::routes)
                                .configure(crate::console::routes)
                        })
                        .listen(http)?
                        .workers(1)
                        .disable_signals()
                        .run();
                        Ok::<_, std::io::Error>((mqtt, http))
                    })();
                    match started {
                        Ok((mqtt, http)) => {
                            let _ = ready_tx.send(Ok(()));
                            let _ = stop_rx.await;
                            mqtt.stop(true).await;
                            http.stop(true).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
        })?;
    ready_rx.recv().context("network thread ended early")??;
    Ok(NetThread {
        stop: Some(stop_tx),
        join,
    })
}

async fn healthz(health: web::types::State<Arc<Health>>) -> HttpResponse {
    let (ok, body) = health.report();
    let mut r = if ok {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    r.content_type("application/json").body(body.to_string())
}

async fn metrics(health: web::types::State<Arc<Health>>) -> HttpResponse {
    health.refresh_gauges();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(health.metrics.encode())
}

/// With encryption at rest, how often the write-ahead log starts a new
/// segment (so the old one, payloads in the clear, goes once stored).
const WAL_PLAINTEXT_ROLL: Duration = Duration::from_secs(60);

#[allow(clippy::too_many_arguments)]
fn housekeeping(
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    metrics: Arc<Metrics>,
    wal: WalControl,
    budget: Arc<MemoryBudget>,
    root: PathBuf,
    process: usize,
    policy: CompactionPolicy,
    keys: Option<Arc<wardflow_storage::seal::Keyring>>,
    retention: wardflow_storage::retention::Retention,
) {
    let mut compactor = Compactor::new(policy);
    let mut last_compaction = Instant::now();
    let mut last_retention: Option<Instant> = None;
    let mut erasures = keys.as_ref().map_or(0, |k| k.erasure_count());
    let mut last_roll = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        if keys.is_some() && last_roll.elapsed() >= WAL_PLAINTEXT_ROLL {
            // The log holds payloads as received: with encryption at rest a
            // segment is closed every minute, so it is deleted once stored
            // and no payload stays in the clear much longer than that.
            last_roll = Instant::now();
            wal.roll();
        }
        if let Some(k) = &keys {
            // An erasure from the command line: the log's current segment
            // may hold the patient's payloads in the clear; a new one lets
            // it go as soon as the store has what it held.
            match k.refresh() {
                Ok(()) if k.erasure_count() != erasures => {
                    erasures = k.erasure_count();
                    tracing::info!("a data key was erased; starting a new write-ahead log segment");
                    wal.roll();
                }
                Ok(()) => {}
                Err(e) => tracing::warn!("rereading the keyring: {e}"),
            }
        }
        wal.truncate_below(progress.truncate_below.load(Ordering::Relaxed));
        refresh_gauges(&metrics, &progress, &budget);
        if retention != Default::default()
            && last_retention.is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            last_retention = Some(Instant::now());
            match wardflow_storage::retention::drop_expired(
                &root,
                process,
                wardflow_model::now_ns(),
                &retention,
            ) {
                Ok(dropped) => {
                    for d in dropped {
                        metrics.engine.retention_partitions_dropped.inc();
                        metrics.engine.retention_rows_dropped.inc_by(d.rows);
                    }
                }
                Err(e) => tracing::warn!("dropping expired partitions failed, will retry: {e}"),
            }
        }
        if last_compaction.elapsed() >= Duration::from_secs(5) {
            last_compaction = Instant::now();
            let checkpoint = progress.checkpoint.load(Ordering::Relaxed);
            if checkpoint > 0 {
                compact_once(&mut compactor, &root, process, checkpoint, &metrics);
            }
        }
    }
}

fn compact_once(
    compactor: &mut Compactor,
    root: &Path,
    process: usize,
    checkpoint: u64,
    metrics: &Metrics,
) {
    match compactor.run(root, process, checkpoint) {
        Ok(s) if s.files_in > 0 => {
            metrics
                .engine
                .compaction_files_merged
                .inc_by(s.files_in as u64);
            tracing::debug!(
                files_in = s.files_in,
                files_out = s.files_out,
                rows = s.rows,
                "compacted"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("compaction failed, will retry: {e}"),
    }
    if let Err(e) =
        consolidate_states::<wardflow_ingest::validate::DeviceState>(root, process, checkpoint)
    {
        tracing::warn!("consolidating device states failed, will retry: {e}");
    }
}
