//! The timely dataflow: from logged publishes to stored readings.
//!
//! ```text
//! shard channel (one per worker, fed by the write-ahead log, sharded by device)
//!   └▶ input ─exchange by patient─▶ Validate ─▶ Store ─▶ Checkpoint ─▶ probe
//!                                   decode,      buffer an      persist the
//!                                   validate,    interval,      stored frontier
//!                                   dead letters flush when     (worker 0 of each
//!                                                it is complete process)
//! ```
//!
//! Beside Store, the Alert operator evaluates rules per patient
//! ([`crate::alerting`]); its transitions about a patient meet the
//! accesses in force (consents read from the chain, break-glass access:
//! a differential collection fed by worker 0 of process 0) in the consent
//! join, which decides who outside the admitting unit receives each one
//! ([`consent_join`]).
//!
//! Time is the write-ahead log's commit epoch (ms). The Store operator holds
//! a capability for every interval it has not yet flushed, so the frontier
//! after it is the *stored* frontier: every publish logged before it is in
//! the store, in every process. The Checkpoint operator writes that frontier
//! (rounded down to an interval boundary) to disk and holds its own output
//! back until it did, so the frontier after it tells when every process has
//! checkpointed, and the log may forget what lies before.
//!
//! On start, the processes agree on the smallest checkpoint among them (a
//! small dataflow of its own), each removes its files from that point on,
//! and the log replays from there: every acknowledged publish is stored
//! exactly once.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crossbeam_channel::{Sender, TryRecvError};
use parking_lot::Mutex;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::vec::broadcast::Broadcast;
use timely::dataflow::operators::{Exchange, Inspect, Operator, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};
use timely::worker::Worker;
use wardflow_ingest::budget::Permit;
use wardflow_ingest::codec::{self, DecodedReading};
use wardflow_ingest::feeds::{ClinicalCommand, CommandKind};
use wardflow_ingest::observations::ObservationTail;
use wardflow_ingest::priority::{BackgroundIo, lower_current_thread};
use wardflow_ingest::validate::{DeviceState, Receipt, ValidationConfig, Validator};
use wardflow_ingest::wal::{InputEvent, ShardSource};
use wardflow_ingest::{Envelope, metrics::IngestMetrics};
use wardflow_model::{DeadLetter, DeviceId, PatientId, Reading, TimestampNs};
use wardflow_rules::alarm::Alert;
use wardflow_storage::checkpoint::{load_states, read_checkpoint, recover, write_checkpoint};
use wardflow_storage::{Origin, ShardWriter, StoreConfig};

use crate::alerting::{AlertContext, AlertOut, AlertWorker};
use crate::ledger::LedgerMsg;
use crate::metrics::{EngineMetrics, Progress};
use differential_dataflow::AsCollection as _;
use differential_dataflow::input::InputSession;
use wardflow_ingest::feeds::GrantRef;
use wardflow_ledger_bridge::consent::{Access, covers};

/// One publish after validation: what Store writes and later stages
/// (rules, research) will read. It goes to more than one operator on the
/// same worker, and timely clones it for all but one of them: the parts
/// that own heap memory are shared, so that clone copies no reading.
#[derive(Debug, Clone)]
pub struct Validated {
    pub device: DeviceId,
    pub patient: Option<PatientId>,
    pub received_ns: TimestampNs,
    pub readings: Arc<Vec<Reading>>,
    pub dead: Vec<DeadLetter>,
    /// The device's validation state after this publish (checkpointed).
    pub state: Arc<DeviceState>,
    /// The publish's share of the memory budget, held until it is stored:
    /// so ingest slows down when storage falls behind.
    pub permit: Option<Arc<Permit>>,
}

/// What every worker needs.
pub struct DataflowContext {
    pub root: PathBuf,
    pub process: usize,
    pub workers_per_process: usize,
    pub interval_ms: u64,
    pub validation: ValidationConfig,
    pub sources: Mutex<Vec<Option<ShardSource>>>,
    /// Worker 0 of the process sends the agreed checkpoint here once its
    /// files are recovered: the log may then replay from it.
    pub recovered: Mutex<Option<Sender<anyhow::Result<u64>>>>,
    pub ingest_metrics: Arc<IngestMetrics>,
    pub metrics: Arc<EngineMetrics>,
    pub progress: Arc<Progress>,
    /// Rules, admissions and where alerts go.
    pub alerts: Arc<AlertContext>,
    /// Clinicians' commands; worker 0 of the process takes them.
    pub commands: Mutex<Option<crossbeam_channel::Receiver<ClinicalCommand>>>,
    /// Where flushes send the audit-trail leaves of what they wrote; none
    /// when the ledger is off.
    pub ledger: Option<Sender<LedgerMsg>>,
    /// Consents opening and closing (from the chain, and break-glass
    /// access); worker 0 of process 0 takes them.
    pub consents: Mutex<Option<crossbeam_channel::Receiver<ConsentChange>>>,
    /// The research stage (studies, census); none when no study may run.
    pub research: Option<Arc<crate::research::ResearchContext>>,
    /// Data keys for sealing values at rest; none stores them in the clear.
    pub keys: Option<Arc<wardflow_storage::seal::Keyring>>,
    /// Where flushes also send their rows, when `storage.backend` names
    /// QuestDB (docs/questdb.md).
    pub questdb: Option<wardflow_storage::questdb::SinkHandle>,
    /// Whether flushes write the embedded store's readings and dead
    /// letters (device states are written either way).
    pub embedded: bool,
    /// The memory budget readings hold until stored: flushes step back on
    /// the disk only while it is far from spent.
    pub budget: Arc<wardflow_ingest::budget::MemoryBudget>,
}

/// A change to the accesses in force.
#[derive(Debug, Clone)]
pub enum ConsentChange {
    Open(Access),
    Close(Access),
}

/// An alert transition leaving the Alert operator: to the other processes'
/// feeds (in a cluster) and to the consent join.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Transition {
    /// The process whose alert log has it.
    pub origin: usize,
    pub patient: Option<String>,
    pub at_ns: i64,
    pub json: String,
}

/// Runs one worker: recovery, the dataflow, and the input loop until the
/// write-ahead log closes its shard.
pub fn run_worker(worker: &mut Worker, ctx: &DataflowContext) {
    let index = worker.index();
    let local = index % ctx.workers_per_process;
    let leader = local == 0;

    // 1. Agree on the checkpoint every process reached.
    let mine = if leader {
        match read_checkpoint(&ctx.root, ctx.process) {
            Ok(c) => Some(c),
            Err(e) => {
                report_recovery(
                    ctx,
                    Err(anyhow::anyhow!("reading the storage checkpoint: {e}")),
                );
                Some(0)
            }
        }
    } else {
        None
    };
    let checkpoint = agree_min(worker, mine);

    // 2. Remove what the replay will write again; hand the checkpoint to the log.
    if leader {
        let result = recover(&ctx.root, ctx.process, checkpoint)
            .map(|report| {
                tracing::info!(
                    checkpoint,
                    removed = report.uncommitted,
                    covered = report.covered,
                    temporary = report.temporary,
                    "storage recovered"
                );
                checkpoint
            })
            .map_err(|e| anyhow::anyhow!("recovering the store: {e}"));
        ctx.progress.checkpoint.store(checkpoint, Ordering::Relaxed);
        report_recovery(ctx, result);
    }
    let states = match load_states::<DeviceState>(&ctx.root, checkpoint) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(
                "device states not restored, resends right after this restart may be stored twice: {e}"
            );
            Default::default()
        }
    };

    // 3. The dataflow.
    let mut input: InputHandle<u64, _> = InputHandle::new();
    let mut commands: InputHandle<u64, CapacityContainerBuilder<Vec<ClinicalCommand>>> =
        InputHandle::new();
    let mut consents: InputSession<u64, (String, Access), isize> = InputSession::new();
    let stored = ProbeHandle::new();
    let persisted = ProbeHandle::new();
    // In a cluster, a worker may only leave once the alert relay between
    // processes is complete too, or its peers lose their connection to it.
    let relay_done = ProbeHandle::new();
    let store_config = StoreConfig {
        root: ctx.root.clone(),
        process: ctx.process,
        interval_ms: ctx.interval_ms,
    };
    worker.dataflow::<u64, _, _>(|scope| {
        // The log shards publishes by the same route the exchange uses, so
        // in one process each is already on its worker: an exchange there
        // would only hold it back (it buffers until the epoch closes, up to
        // an idle tick, 20 ms). Across processes it must move.
        let arrived = input.to_stream(scope);
        let routed = if scope.peers() == ctx.workers_per_process {
            arrived
        } else {
            arrived.exchange(|e: &Envelope| e.route())
        };
        let validated = routed
            .unary::<CapacityContainerBuilder<Vec<Validated>>, _, _, _>(Pipeline, "Validate", {
                let metrics = ctx.ingest_metrics.clone();
                let config = ctx.validation;
                move |_cap, _info| {
                    let mut validator = Validator::new(config);
                    validator.restore(states);
                    let mut decoded = Vec::new();
                    move |input, output| {
                        input.for_each(|cap, data: &mut Vec<Envelope>| {
                            let mut session = output.session(&cap);
                            for env in data.drain(..) {
                                session.give(validate_one(&mut validator, &mut decoded, env));
                            }
                        });
                        metrics.record_validation(&validator.take_counts());
                    }
                }
            });
        let command_stream = commands
            .to_stream(scope)
            .exchange(|c: &ClinicalCommand| c.route());
        // Transitions go to this process's feeds and alert log from the
        // operator itself; in a cluster they also travel to every other
        // process, whose clinicians may follow the same units. Those about
        // a patient go on to the consent join too.
        let cluster = scope.peers() > ctx.workers_per_process;
        let relayed = validated.clone().binary_frontier::<_, CapacityContainerBuilder<Vec<Transition>>, _, _, _, _>(command_stream, Pipeline, Pipeline, "Alert", {
            let alerts = ctx.alerts.clone();
            let peers = scope.peers();
            let process = ctx.process;
            move |cap, _info| {
                let mut worker = AlertWorker::new(alerts, index, peers);
                let mut cap = Some(cap);
                move |(readings, frontier), (cmds, cmd_frontier), output| {
                    readings.for_each(|_, data: &mut Vec<Validated>| {
                        for v in data.iter() {
                            worker.on_validated(v);
                        }
                    });
                    cmds.for_each(|_, data: &mut Vec<ClinicalCommand>| {
                        for c in data.iter() {
                            worker.on_command(c);
                        }
                    });
                    if let Some(&t) = frontier.frontier().first() {
                        worker.on_time(t);
                        if let Some(c) = cap.as_mut()
                            && *c.time() < t
                        {
                            c.downgrade(&t);
                        }
                    }
                    let sent = worker.flush();
                    if !sent.is_empty()
                        && let Some(c) = &cap
                    {
                        // As JSON: the alert's optional fields are skipped
                        // when empty, which only a self-describing format reads back.
                        output.session(c).give_iterator(
                            sent.iter()
                                .filter(|a| cluster || a.patient.is_some())
                                .filter_map(|a| {
                                    Some(Transition {
                                        origin: process,
                                        patient: a.patient.as_ref().map(|p| p.as_str().to_string()),
                                        at_ns: a.at_ns,
                                        json: serde_json::to_string(a).ok()?,
                                    })
                                }),
                        );
                    }
                    if frontier.is_empty() && cmd_frontier.is_empty() {
                        cap = None;
                    }
                }
            }
        });
        if cluster {
            let relay = ctx.alerts.out.clone();
            let process = ctx.process;
            relayed.clone().broadcast().probe_with(&relay_done).sink(Pipeline, "AlertRelay", move |(input, _)| {
                input.for_each(|_, data: &mut Vec<Transition>| {
                    for t in data.drain(..) {
                        // One worker per process relays; the origin logged it.
                        if leader
                            && t.origin != process
                            && let Ok(alert) = serde_json::from_str::<Alert>(&t.json)
                        {
                            let _ = relay.send(AlertOut { alert, log: false, to: None });
                        }
                    }
                });
            });
        }
        let consent_collection = consents.to_collection(scope);
        if let Some(research) = &ctx.research {
            crate::research::research(validated.clone(), consent_collection.inner.clone(), research.clone());
        }
        consent_join(relayed, consent_collection, ctx.alerts.out.clone(), leader)
            .probe_with(&relay_done);
        let stored_stream = validated.unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(Pipeline, "Store", {
            let metrics = ctx.metrics.clone();
            let progress = ctx.progress.clone();
            move |initial, info| {
                drop(initial);
                let ledger = ctx.ledger.clone();
                let mut writer: ShardWriter<DeviceState> =
                    ShardWriter::new(store_config, index)
                        .collect_leaves(ledger.is_some())
                        .with_keyring(ctx.keys.clone());
                let interval_ms = writer.config().interval_ms;
                let activator = scope.activator_for(info.address.clone());
                // Complete intervals are encoded and written on a thread of
                // their own: a flush takes hundreds of milliseconds at full
                // load, and the worker's other operators (the alert rules)
                // must not wait for it. One flush at a time per worker.
                let (jobs, job_rx) = crossbeam_channel::bounded::<ShardWriter<DeviceState>>(1);
                let (done_tx, done) = crossbeam_channel::unbounded();
                let wake = scope.worker().sync_activator_for(info.address.to_vec());
                let (questdb, embedded) = (ctx.questdb.clone(), ctx.embedded);
                let budget = ctx.budget.clone();
                std::thread::Builder::new()
                    .name(format!("flush-{index}"))
                    .spawn(move || {
                        // A flush's disk requests wait behind the
                        // write-ahead log's while readings waiting for
                        // storage hold under half the memory budget; past
                        // that they compete, so that no other process's
                        // I/O can starve a flush while ingest waits on it.
                        lower_current_thread(BackgroundIo::Idle);
                        let mut io = BackgroundIo::Idle;
                        while let Ok(mut job) = job_rx.recv() {
                            let wanted = if budget.in_use() * 2 < budget.capacity() {
                                BackgroundIo::Idle
                            } else {
                                BackgroundIo::Lowest
                            };
                            if wanted != io {
                                io = wanted;
                                wardflow_ingest::priority::set_current_thread_io(io);
                            }
                            let result = flush_job(&mut job, questdb.as_ref(), embedded);
                            // The leaves of what was written go to the ledger
                            // before the flush is reported: the stored
                            // frontier passes their epochs only after that.
                            if let Some(ledger) = &ledger {
                                let leaves = job.take_leaves();
                                if !leaves.is_empty() && ledger.send(LedgerMsg::Leaves(leaves)).is_err() {
                                    tracing::error!("the ledger thread stopped; these rows stay unsealed until a restart");
                                }
                            }
                            if done_tx.send((job, result)).is_err() {
                                break;
                            }
                            let _ = wake.activate();
                        }
                    })
                    .expect("spawn the flush thread");
                let mut in_flight: Option<Vec<u64>> = None;
                let mut retry_at: Option<std::time::Instant> = None;
                // The least capability of each interval not yet written, and
                // the memory budget its publishes hold.
                let mut held: BTreeMap<u64, (Capability<u64>, Vec<Arc<Permit>>)> = BTreeMap::new();
                move |(input, frontier), output| {
                    input.for_each(|cap, data: &mut Vec<Validated>| {
                        let Some(&time) = cap.least() else { return };
                        let interval = time - time % interval_ms;
                        let Some(entry) = (match held.get_mut(&interval) {
                            Some(e) => {
                                if e.0.time() > &time
                                    && let Some(c) = cap.retain_least(output.output_index())
                                {
                                    e.0 = c;
                                }
                                Some(e)
                            }
                            None => cap
                                .retain_least(output.output_index())
                                .map(|c| held.entry(interval).or_insert((c, Vec::new()))),
                        }) else {
                            return;
                        };
                        for v in data.drain(..) {
                            writer.append(time, Origin { device: &v.device, patient: v.patient.as_ref(), received_ns: v.received_ns }, &v.readings, v.dead, Arc::unwrap_or_clone(v.state));
                            entry.1.extend(v.permit);
                        }
                    });
                    // A flush finished.
                    while let Ok((leftover, result)) = done.try_recv() {
                        in_flight = None;
                        match result {
                            Ok(stats) => {
                                metrics.readings_stored.inc_by(stats.readings);
                                metrics.dead_letters_stored.inc_by(stats.dead_letters);
                                metrics.storage_files_written.inc_by(stats.files as u64);
                                metrics.storage_bytes_written.inc_by(stats.bytes);
                                metrics.storage_flush_seconds.observe(stats.micros as f64 / 1e6);
                                progress.storage_healthy.store(true, Ordering::Relaxed);
                            }
                            Err(e) => {
                                tracing::error!("storage flush failed, retrying in 1 s (data stays in the write-ahead log): {e}");
                                metrics.storage_errors.inc();
                                progress.storage_healthy.store(false, Ordering::Relaxed);
                                // What was not written is written again.
                                writer.absorb(leftover);
                                retry_at = Some(std::time::Instant::now() + Duration::from_secs(1));
                                activator.activate_after(Duration::from_secs(1));
                            }
                        }
                    }
                    let f = frontier.frontier().first().copied();
                    let complete = writer
                        .earliest_pending()
                        .is_some_and(|s| f.is_none_or(|f| s + interval_ms <= f));
                    if complete
                        && in_flight.is_none()
                        && retry_at.is_none_or(|t| std::time::Instant::now() >= t)
                    {
                        retry_at = None;
                        let job = writer.split_before(f);
                        in_flight = Some(job.intervals().collect());
                        if jobs.send(job).is_err() {
                            tracing::error!("the flush thread stopped; data stays in the write-ahead log");
                            progress.storage_healthy.store(false, Ordering::Relaxed);
                        }
                    }
                    // Release the capabilities and memory of written intervals.
                    held.retain(|interval, _| {
                        writer.intervals().any(|i| i == *interval)
                            || in_flight.as_ref().is_some_and(|f| f.contains(interval))
                    });
                    metrics.storage_pending_readings.set(writer.pending_rows() as i64);
                }
            }
        });
        let stored_stream = stored_stream.probe_with(&stored);
        stored_stream
            .unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(Pipeline, "Checkpoint", {
                let root = ctx.root.clone();
                let process = ctx.process;
                let interval_ms = ctx.interval_ms;
                let progress = ctx.progress.clone();
                let metrics = ctx.metrics.clone();
                move |cap, info| {
                    let activator = scope.activator_for(info.address.clone());
                    // Only one worker per process writes; the others hold nothing.
                    let mut cap = leader.then_some(cap);
                    let mut persisted = checkpoint;
                    move |(input, frontier), _output| {
                        input.for_each(|_, _: &mut Vec<()>| {});
                        let Some(c) = cap.as_mut() else { return };
                        match frontier.frontier().first() {
                            Some(&f) => {
                                let boundary = f - f % interval_ms;
                                if boundary > persisted {
                                    match write_checkpoint(&root, process, boundary) {
                                        Ok(()) => {
                                            persisted = boundary;
                                            c.downgrade(&boundary);
                                            progress.checkpoint.store(boundary, Ordering::Relaxed);
                                            metrics.checkpoint_epoch_ms.set(boundary as i64);
                                        }
                                        Err(e) => {
                                            tracing::error!("writing the storage checkpoint failed, retrying: {e}");
                                            activator.activate_after(Duration::from_secs(1));
                                        }
                                    }
                                }
                            }
                            None => {
                                cap = None;
                            }
                        }
                    }
                }
            })
            .probe_with(&persisted);
    });

    // 4. Feed the input from this worker's shard of the log.
    let source = ctx.sources.lock()[local]
        .take()
        .expect("one source per local worker");
    source.wake.register_current();
    let command_rx = if leader {
        ctx.commands.lock().take()
    } else {
        None
    };
    let mut observations = leader.then(|| ObservationTail::new(&ctx.root));
    let consent_rx = if leader {
        ctx.consents.lock().take()
    } else {
        None
    };
    let mut in_force = InForce::new();
    let mut last_poll = std::time::Instant::now() - Duration::from_secs(1);
    let mut open = true;
    while open {
        let mut fed = 0usize;
        if let Some(rx) = &command_rx {
            while let Ok(c) = rx.try_recv() {
                commands.send(c);
                fed += 1;
            }
        }
        if let Some(tail) = observations.as_mut()
            && last_poll.elapsed() >= Duration::from_millis(200)
        {
            last_poll = std::time::Instant::now();
            match tail.poll() {
                Ok(records) => {
                    for r in records {
                        commands.send(ClinicalCommand {
                            kind: CommandKind::Observe {
                                patient: r.patient.clone(),
                                observation: r.observation(),
                            },
                            by: r.by.clone(),
                            at_ns: r.time_ns,
                            reply: None,
                        });
                        fed += 1;
                    }
                }
                Err(e) => tracing::warn!("reading manual observations: {e}"),
            }
        }
        loop {
            match source.rx.try_recv() {
                Ok(InputEvent::Data(env)) => {
                    if env.epoch > *input.time() {
                        input.advance_to(env.epoch);
                    }
                    input.send(env);
                    fed += 1;
                    if fed >= 1024 {
                        break;
                    }
                }
                Ok(InputEvent::Advance(e)) => {
                    if e > *input.time() {
                        input.advance_to(e);
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if *commands.time() < *input.time() {
            commands.advance_to(*input.time());
        }
        if *consents.time() < *input.time() {
            consents.advance_to(*input.time());
        }
        if let Some(rx) = &consent_rx {
            fed += feed_consents(rx, &mut in_force, &mut consents);
        }
        // A differential input session moves its frontier only when flushed.
        consents.flush();
        if leader {
            publish_progress(ctx, &stored, &persisted);
        }
        if fed > 0 {
            // An input handle keeps what it was given until its buffer fills
            // or time advances: hand it over now, or a publish waits for the
            // next commit or idle tick (20 ms) before any rule sees it.
            input.flush();
            commands.flush();
            worker.step();
        } else {
            worker.step_or_park(Some(Duration::from_millis(20)));
        }
    }

    // 5. The log is closed: finish, flushing everything.
    drop(input);
    drop(commands);
    drop(consents);
    let cluster = ctx.workers_per_process < worker.peers();
    while !persisted.done() || (cluster && !relay_done.done()) {
        worker.step_or_park(Some(Duration::from_millis(5)));
    }
    if leader {
        publish_progress(ctx, &stored, &persisted);
    }
}

/// Applies the consent changes that arrived, and ends the accesses whose
/// time is up (at the input's epoch: wall-clock milliseconds). Returns how
/// many changes it made.
fn feed_consents(
    rx: &crossbeam_channel::Receiver<ConsentChange>,
    in_force: &mut InForce,
    consents: &mut InputSession<u64, (String, Access), isize>,
) -> usize {
    let mut changed = 0;
    while let Ok(c) = rx.try_recv() {
        match c {
            ConsentChange::Open(a) => {
                if in_force.insert((a.not_after_ms, a.clone())) {
                    consents.insert((a.patient.clone(), a));
                    changed += 1;
                }
            }
            ConsentChange::Close(a) => {
                if in_force.remove(&(a.not_after_ms, a.clone())) {
                    consents.remove((a.patient.clone(), a));
                    changed += 1;
                }
            }
        }
    }
    // Ordered by end: only the accesses that ended are looked at.
    let now = *consents.time();
    while in_force.first().is_some_and(|(end, _)| *end <= now) {
        if let Some((_, a)) = in_force.pop_first() {
            consents.remove((a.patient.clone(), a));
            changed += 1;
        }
    }
    changed
}

/// The accesses in force, by when they end.
type InForce = std::collections::BTreeSet<(u64, Access)>;

/// The consent join: each alert transition about a patient, joined with
/// the accesses in force (a differential collection keyed by patient) *as
/// of the transition's time*, goes to every grantee whose access covers
/// alerts for treatment or an emergency and had not expired at the
/// alert's time. A transition enters the join at its time and leaves it
/// one tick later, so the join answers "what held then" and keeps nothing;
/// the corrections a later consent change makes to past times are
/// dropped: a revocation never reaches back, and a new grant does not
/// replay old alerts. Deliveries go to the feeds of every process (the
/// grantee may be connected to any).
fn consent_join<'s>(
    transitions: timely::dataflow::Stream<'s, u64, Vec<Transition>>,
    consents: differential_dataflow::VecCollection<'s, u64, (String, Access), isize>,
    out: crossbeam_channel::Sender<AlertOut>,
    leader: bool,
) -> timely::dataflow::Stream<'s, u64, Vec<(String, String, GrantRef)>> {
    type Keyed = (String, (u64, i64, String));
    let alerts = transitions
        .unary::<CapacityContainerBuilder<Vec<(Keyed, u64, isize)>>, _, _, _>(
            Pipeline,
            "AlertsAsOf",
            |_, _| {
                move |input, output| {
                    input.for_each(|cap, data: &mut Vec<Transition>| {
                        let Some(&t) = cap.least() else {
                            return;
                        };
                        let keyed: Vec<Keyed> = data
                            .drain(..)
                            .filter_map(|x| Some((x.patient?, (t, x.at_ns, x.json))))
                            .collect();
                        output
                            .session(&cap)
                            .give_iterator(keyed.iter().cloned().map(|k| (k, t, 1)));
                        output
                            .session(&cap.delayed(&(t + 1), 0))
                            .give_iterator(keyed.into_iter().map(|k| (k, t + 1, -1)));
                    });
                }
            },
        )
        .as_collection();
    let granted = alerts
        .join_map(consents, |patient, (epoch, at_ns, json), access| {
            (
                patient.clone(),
                *epoch,
                *at_ns,
                json.clone(),
                access.clone(),
            )
        })
        .inner
        .unary::<CapacityContainerBuilder<Vec<(String, String, GrantRef)>>, _, _, _>(
            Pipeline,
            "Granted",
            |_, _| {
                move |input, output| {
                    input.for_each(|cap, data: &mut Vec<_>| {
                        let mut session = output.session(&cap);
                        for ((_, epoch, at_ns, json, a), time, diff) in data.drain(..) {
                            let at_ms = (at_ns / 1_000_000).max(0) as u64;
                            let (a, json): (Access, String) = (a, json);
                            if diff > 0
                                && time == epoch
                                && at_ms < a.not_after_ms
                                && covers(&a.scope, "alerts")
                                && (a.purpose == "treatment" || a.purpose == "emergency")
                            {
                                session.give((
                                    a.grantee,
                                    json,
                                    GrantRef {
                                        purpose: a.purpose,
                                        version: a.version,
                                    },
                                ));
                            }
                        }
                    });
                }
            },
        );
    granted
        .broadcast()
        .inspect(move |(clinician, json, grant)| {
            if leader && let Ok(alert) = serde_json::from_str::<Alert>(json) {
                let _ = out.send(AlertOut {
                    alert,
                    log: false,
                    to: Some((clinician.clone(), grant.clone())),
                });
            }
        })
}

/// Writes one flush job: to QuestDB first, when it runs (its rows count
/// once the receiver or the spool has them; a full spool fails the flush,
/// so the interval stays in the write-ahead log and is tried again), then
/// to the embedded store, or only the device states when QuestDB is the
/// sole backend. A job retried after the embedded write failed is sent to
/// QuestDB again: its tables deduplicate (docs/questdb.md).
fn flush_job(
    job: &mut ShardWriter<DeviceState>,
    questdb: Option<&wardflow_storage::questdb::SinkHandle>,
    embedded: bool,
) -> anyhow::Result<wardflow_storage::FlushStats> {
    if let Some(sink) = questdb {
        let batch = wardflow_storage::questdb::Batch::from_writer(job);
        sink.submit(batch)
            .and_then(|r| r.wait())
            .map_err(|e| anyhow::anyhow!("QuestDB sink: {e}"))?;
    }
    Ok(if embedded {
        job.flush_before(None)?
    } else {
        job.flush_states_before(None)?
    })
}

fn report_recovery(ctx: &DataflowContext, result: anyhow::Result<u64>) {
    if let Some(tx) = ctx.recovered.lock().take() {
        let _ = tx.send(result);
    }
}

fn publish_progress(
    ctx: &DataflowContext,
    stored: &ProbeHandle<u64>,
    persisted: &ProbeHandle<u64>,
) {
    let first = |p: &ProbeHandle<u64>| p.with_frontier(|f| f.first().copied());
    if let Some(s) = first(stored) {
        // Release: the ledger reads the frontier, then the leaves sent
        // before it moved (engine::ledger).
        ctx.progress.stored_frontier.store(s, Ordering::Release);
    }
    if let Some(p) = first(persisted) {
        ctx.progress.truncate_below.store(p, Ordering::Relaxed);
    }
}

/// Decodes and validates one logged publish.
fn validate_one(
    validator: &mut Validator,
    decoded: &mut Vec<DecodedReading>,
    env: Envelope,
) -> Validated {
    decoded.clear();
    let receipt = Receipt {
        device: &env.device,
        patient: env.patient.as_ref(),
        received_ns: env.received_ns,
    };
    let mut readings = Vec::new();
    let mut dead = Vec::new();
    let state = match codec::decode(&env.payload, env.received_ns, decoded) {
        Ok(_) => validator.validate(receipt, decoded, &mut readings, &mut dead),
        Err(e) => {
            tracing::debug!(device = %env.device, "undecodable payload: {e}");
            validator.reject_payload(receipt, &e, &env.payload, &mut dead);
            validator
                .device_state(env.device.as_str())
                .cloned()
                .unwrap_or_default()
        }
    };
    Validated {
        device: env.device,
        patient: env.patient,
        received_ns: env.received_ns,
        readings: Arc::new(readings),
        dead,
        state: Arc::new(state),
        permit: env.permit,
    }
}

/// The minimum of the values the workers offer (each process's leader
/// offers its checkpoint), known to every worker.
fn agree_min(worker: &mut Worker, mine: Option<u64>) -> u64 {
    let seen = Rc::new(RefCell::new(Vec::new()));
    let sink = seen.clone();
    let mut input: InputHandle<u64, _> = InputHandle::new();
    let probe = ProbeHandle::new();
    worker.dataflow::<u64, _, _>(|scope| {
        input
            .to_stream(scope)
            .broadcast()
            .inspect(move |x: &u64| sink.borrow_mut().push(*x))
            .probe_with(&probe);
    });
    if let Some(v) = mine {
        input.send(v);
    }
    drop(input);
    while !probe.done() {
        worker.step_or_park(Some(Duration::from_millis(1)));
    }
    seen.borrow().iter().copied().min().unwrap_or(0)
}
