//! The research stage of the dataflow, and the Flight server beside it.
//!
//! ```text
//! validated ─▶ ResearchWindows ─exchange to worker 0─▶ Release ─▶ studies' live streams
//!              per worker: each patient's                ▲        and release logs
//!              readings per window (count,               │
//!              sum per metric), emitted when    consents (research purposes)
//!              the window closes
//! ```
//!
//! Windows are tumbling windows of the dataflow's time (the write-ahead
//! log's commit epoch, ms): a window closes when the frontier passes its
//! end, so every reading logged in it has been seen. Worker 0 of process 0
//! then, for each study with that window length, keeps the patients whose
//! research consent for the study was in force for the whole window
//! (opened at or before its start, not ended before its end, covering
//! vitals), cohorts them by their admission, and releases the window
//! ([`wardflow_research::release`]). A window is released even when no
//! patient qualifies, so the budget spent does not depend on the data.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use timely::container::CapacityContainerBuilder;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::{Capability, Operator};
use wardflow_ingest::census::{CensusWatcher, Sex};
use wardflow_ledger_bridge::consent::{Access, covers};
use wardflow_model::{Metric, PatientId, Quality};
use wardflow_research::privacy::Noise;
use wardflow_research::release::{Cohort, Contribution, release_window};
use wardflow_research::store::Registry;

use crate::dataflow::Validated;

/// Per metric: readings and their sum.
type Sums = [(u32, f64); Metric::COUNT];

/// A change to the accesses in force, as the consent collection carries it.
type ConsentUpdate = ((String, Access), u64, isize);

/// Open windows on one worker: (length, start) → the window's capability
/// and each patient's sums.
type OpenWindows = BTreeMap<(u64, u64), (Capability<u64>, HashMap<PatientId, Sums>)>;

/// One patient's readings in one window, from one worker.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PatientWindow {
    pub window_ms: u64,
    pub start_ms: u64,
    pub patient: String,
    pub sums: Sums,
}

/// What the research stage needs.
pub struct ResearchContext {
    pub registry: Arc<Registry>,
    pub census: Arc<CensusWatcher>,
    /// Whether this process releases (process 0).
    pub releases: bool,
    /// Closed windows, to the release thread.
    jobs: crossbeam_channel::Sender<ReleaseJob>,
}

/// A closed window of one study, with the contributions that qualified.
struct ReleaseJob {
    live: Arc<wardflow_research::store::Live>,
    start: u64,
    end: u64,
    contributions: BTreeMap<String, Contribution>,
}

impl ResearchContext {
    /// The context, and (when this process releases) the thread that
    /// releases windows: charging the budget, writing the state and the
    /// release log (fsyncs) happen there, not on the dataflow's worker,
    /// whose other operators raise alerts.
    pub fn new(
        registry: Arc<Registry>,
        census: Arc<CensusWatcher>,
        releases: bool,
    ) -> anyhow::Result<Arc<ResearchContext>> {
        let (jobs, rx) = crossbeam_channel::unbounded::<ReleaseJob>();
        if releases {
            std::thread::Builder::new()
                .name("research-release".into())
                .spawn(move || {
                    let mut noise = Noise::from_os();
                    for job in rx {
                        let ReleaseJob {
                            live,
                            start,
                            end,
                            contributions,
                        } = job;
                        let result = live.release(|study, budget, state| {
                            release_window(
                                study,
                                budget,
                                state,
                                start,
                                end,
                                &contributions,
                                &mut noise,
                            )
                            .map_err(|e| e.to_string())
                        });
                        match result {
                            Ok(r) => tracing::debug!(
                                study = %live.study.id,
                                start,
                                rows = r.batch.num_rows(),
                                patients = contributions.len(),
                                "research window released"
                            ),
                            Err(e) => {
                                tracing::debug!(study = %live.study.id, start, "not released: {e}")
                            }
                        }
                    }
                })?;
        }
        Ok(Arc::new(ResearchContext {
            registry,
            census,
            releases,
            jobs,
        }))
    }
}

/// The window lengths of the studies running, looked up at most once a
/// second (the registry reloads itself, [`Registry::spawn_poller`]).
struct Lengths {
    at: Instant,
    lengths: Vec<u64>,
}

impl Lengths {
    fn get(&mut self, registry: &Registry) -> &[u64] {
        if self.at.elapsed() >= Duration::from_secs(1) {
            self.at = Instant::now();
            let mut l: Vec<u64> = registry
                .all()
                .iter()
                .filter(|s| s.ended().is_none())
                .map(|s| s.study.window_ms)
                .collect();
            l.sort_unstable();
            l.dedup();
            self.lengths = l;
        }
        &self.lengths
    }
}

/// Readings that may enter a study: not flagged as doubtful by the device.
fn usable(q: Quality) -> bool {
    !q.contains(Quality::QUESTIONABLE) && !q.contains(Quality::CALIBRATING)
}

/// The research stage: per-worker window sums, then the release on
/// worker 0.
pub fn research<'s>(
    validated: Stream<'s, u64, Vec<Validated>>,
    consents: Stream<'s, u64, Vec<ConsentUpdate>>,
    ctx: Arc<ResearchContext>,
) -> Stream<'s, u64, Vec<()>> {
    // Everything is exchanged to worker 0, which alone releases; the
    // Release operator's other instances see nothing and release nothing.
    let worker_zero = validated.scope().index() == 0;
    let windows = validated
        .unary_frontier::<CapacityContainerBuilder<Vec<PatientWindow>>, _, _, _>(
            Pipeline,
            "ResearchWindows",
            {
                let registry = ctx.registry.clone();
                move |_cap, _info| {
                    let mut lengths = Lengths {
                        at: Instant::now() - Duration::from_secs(2),
                        lengths: Vec::new(),
                    };
                    // (length, start) → the window's capability and its sums.
                    let mut open: OpenWindows = BTreeMap::new();
                    move |(input, frontier), output| {
                        let lengths = lengths.get(&registry);
                        input.for_each(|cap, data: &mut Vec<Validated>| {
                            let Some(&t) = cap.least() else { return };
                            if lengths.is_empty() {
                                return;
                            }
                            for &len in lengths {
                                let start = t - t % len;
                                let entry = open.entry((len, start)).or_insert_with(|| {
                                    (
                                        // Held at the window's last millisecond,
                                        // not at its first reading: a long window
                                        // must not hold back the shorter ones. The
                                        // sums go out at that time, so once the
                                        // frontier reaches the window's end they
                                        // have arrived.
                                        cap.delayed(&(start + len - 1), output.output_index()),
                                        HashMap::new(),
                                    )
                                });
                                for v in data.iter() {
                                    let Some(p) = &v.patient else { continue };
                                    if v.readings.is_empty() {
                                        continue;
                                    }
                                    let sums = entry
                                        .1
                                        .entry(p.clone())
                                        .or_insert([(0, 0.0); Metric::COUNT]);
                                    for r in v.readings.iter().filter(|r| usable(r.quality)) {
                                        let slot = &mut sums[r.metric as usize];
                                        slot.0 += 1;
                                        slot.1 += r.value;
                                    }
                                }
                            }
                        });
                        let f = frontier.frontier().first().copied();
                        let closed: Vec<(u64, u64)> = open
                            .keys()
                            .filter(|(len, start)| f.is_none_or(|f| start + len <= f))
                            .copied()
                            .collect();
                        for key in closed {
                            if let Some((cap, sums)) = open.remove(&key) {
                                output.session(&cap).give_iterator(sums.into_iter().map(
                                    |(patient, sums)| PatientWindow {
                                        window_ms: key.0,
                                        start_ms: key.1,
                                        patient: patient.as_str().to_string(),
                                        sums,
                                    },
                                ));
                            }
                        }
                    }
                }
            },
        );
    windows.binary_frontier::<_, CapacityContainerBuilder<Vec<()>>, _, _, _, _>(
        consents,
        Exchange::new(|_: &PatientWindow| 0u64),
        Exchange::new(|_: &ConsentUpdate| 0u64),
        "Release",
        move |_cap, _info| {
            let mut release = Releaser::new(ctx, worker_zero);
            move |(windows, wf), (consents, cf), _output| {
                windows.for_each(|_, data: &mut Vec<PatientWindow>| {
                    for w in data.drain(..) {
                        release.add(w);
                    }
                });
                consents.for_each(|_, data: &mut Vec<ConsentUpdate>| {
                    for ((_, a), t, diff) in data.drain(..) {
                        if a.purpose.starts_with("research:") {
                            release.consents.entry(t).or_default().push((a, diff));
                        }
                    }
                });
                let f = match (wf.frontier().first(), cf.frontier().first()) {
                    (Some(a), Some(b)) => Some(*a.min(b)),
                    (Some(a), None) | (None, Some(a)) => Some(*a),
                    (None, None) => None,
                };
                if let Some(f) = f {
                    release.close_before(f);
                }
            }
        },
    )
}

/// Worker 0's side: windows to release, and the research consents.
struct Releaser {
    ctx: Arc<ResearchContext>,
    /// Whether this is global worker 0 (of process 0).
    releases: bool,
    /// (length, start) → patient → sums, merged across workers.
    pending: BTreeMap<(u64, u64), HashMap<String, Sums>>,
    /// Consent changes not yet applied, by time.
    consents: BTreeMap<u64, Vec<(Access, isize)>>,
    /// (patient, purpose) → the accesses in force and when each opened.
    in_force: HashMap<(String, String), Vec<(Access, u64)>>,
    /// Per study, the start of the next window to release.
    next: HashMap<String, u64>,
}

impl Releaser {
    fn new(ctx: Arc<ResearchContext>, worker_zero: bool) -> Releaser {
        Releaser {
            releases: ctx.releases && worker_zero,
            ctx,
            pending: BTreeMap::new(),
            consents: BTreeMap::new(),
            in_force: HashMap::new(),
            next: HashMap::new(),
        }
    }

    fn add(&mut self, w: PatientWindow) {
        let sums = self
            .pending
            .entry((w.window_ms, w.start_ms))
            .or_default()
            .entry(w.patient)
            .or_insert([(0, 0.0); Metric::COUNT]);
        for (into, from) in sums.iter_mut().zip(w.sums) {
            into.0 += from.0;
            into.1 += from.1;
        }
    }

    /// Applies the consent changes before `t`.
    fn apply_consents_before(&mut self, t: u64) {
        while let Some(entry) = self.consents.first_entry() {
            if *entry.key() >= t {
                break;
            }
            let (time, changes) = entry.remove_entry();
            for (a, diff) in changes {
                let key = (a.patient.clone(), a.purpose.clone());
                let list = self.in_force.entry(key.clone()).or_default();
                if diff > 0 {
                    list.push((a, time));
                } else if let Some(i) = list.iter().position(|(x, _)| *x == a) {
                    list.remove(i);
                }
                if list.is_empty() {
                    self.in_force.remove(&key);
                }
            }
        }
    }

    /// Whether the patient's consent for `purpose` held over `[start, end)`.
    fn consented(&self, patient: &str, purpose: &str, start: u64, end: u64) -> bool {
        self.in_force
            .get(&(patient.to_string(), purpose.to_string()))
            .is_some_and(|list| {
                list.iter().any(|(a, opened)| {
                    *opened <= start && a.not_after_ms >= end && covers(&a.scope, "vitals")
                })
            })
    }

    /// Releases every window that ends at or before `frontier`.
    fn close_before(&mut self, frontier: u64) {
        if !self.releases {
            self.pending.clear();
            self.consents.clear();
            return;
        }
        let studies = self.ctx.registry.all();
        let census = self.ctx.census.patients.snapshot();
        for live in &studies {
            if live.ended().is_some() {
                continue;
            }
            let len = live.study.window_ms;
            let next = *self.next.entry(live.study.id.clone()).or_insert_with(|| {
                // The first whole window after the study starts running
                // here (by the wall clock, which the epochs follow: the
                // dataflow's time starts at 0 before the log's first
                // epoch), and never one released before a restart; the
                // time the engine was down is not released as empty
                // windows.
                // Two seconds on, so every worker has picked the study up
                // (they look at least once a second) before it begins.
                let now = (wardflow_model::now_ns() / 1_000_000).max(0) as u64 + 2000;
                now.div_ceil(len)
                    .saturating_mul(len)
                    .max(live.state().last_end_ms)
            });
            let mut start = next;
            while start + len <= frontier && live.ended().is_none() {
                let end = start + len;
                self.apply_consents_before(end);
                let purpose = live.study.purpose();
                let mut contributions = BTreeMap::new();
                if let Some(window) = self.pending.get(&(len, start)) {
                    for (patient, sums) in window {
                        if !self.consented(patient, &purpose, start, end) {
                            continue;
                        }
                        let cohort = census.get(patient).map_or_else(
                            || Cohort {
                                unit: wardflow_ingest::census::UNASSIGNED_UNIT.into(),
                                ..Default::default()
                            },
                            |a| Cohort {
                                age_years: a.age_years,
                                sex: a.sex.map(|s| match s {
                                    Sex::F => "F".into(),
                                    Sex::M => "M".into(),
                                    Sex::X => "X".into(),
                                }),
                                unit: a.unit.clone(),
                            },
                        );
                        contributions.insert(
                            patient.clone(),
                            Contribution {
                                cohort,
                                metrics: *sums,
                            },
                        );
                    }
                }
                let job = ReleaseJob {
                    live: live.clone(),
                    start,
                    end,
                    contributions,
                };
                if self.ctx.jobs.send(job).is_err() {
                    tracing::error!("the research release thread stopped");
                }
                start = end;
            }
            self.next.insert(live.study.id.clone(), start);
        }
        self.apply_consents_before(frontier);
        // Windows every study has passed are done with.
        let lowest = |len: u64| {
            studies
                .iter()
                .filter(|s| s.study.window_ms == len && s.ended().is_none())
                .filter_map(|s| self.next.get(&s.study.id))
                .min()
                .copied()
        };
        self.pending
            .retain(|(len, start), _| lowest(*len).is_some_and(|n| *start >= n));
    }
}

/// Starts the Flight server for the studies on a thread of its own.
pub fn start_flight(
    listen: &str,
    registry: Arc<Registry>,
    data_dir: &std::path::Path,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<(std::net::SocketAddr, std::thread::JoinHandle<()>)> {
    let listener = std::net::TcpListener::bind(listen)
        .map_err(|e| anyhow::anyhow!("Flight: cannot listen on {listen}: {e}"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let auth = Arc::new(wardflow_research::store::Authenticator::new(data_dir));
    let join = std::thread::Builder::new()
        .name("flight".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("flight-io")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("Flight: cannot start: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("Flight: {e}");
                        return;
                    }
                };
                let service = wardflow_research::flight::ResearchFlight::new(registry, auth);
                let shutdown = async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                };
                if let Err(e) = wardflow_research::flight::serve(service, listener, shutdown).await
                {
                    tracing::error!("Flight server: {e}");
                }
            });
        })?;
    Ok((addr, join))
}
