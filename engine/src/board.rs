//! The live board the console shows: each patient's latest value of every
//! vital with its NEWS2, and each device's last contact, message rate,
//! sequence gaps and dead letters.
//!
//! The Alert operator owns each patient's latest values already; beside
//! it, a [`BoardWriter`] per worker notes what changed and publishes it to
//! the shared [`Board`] at most every [`PUBLISH_NS`] (one lock per worker
//! per publish, never per reading), then wakes the console's streams. The
//! board holds only this process's patients; it is not stored (the store
//! is) and starts empty.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use wardflow_model::{Metric, TimestampNs};
use wardflow_rules::news2::Risk;

use crate::dataflow::Validated;

/// How often a worker publishes what changed: four times a second.
pub const PUBLISH_NS: i64 = 250_000_000;
/// How often every patient's NEWS2 is recomputed even without new values
/// (values age out of its freshness window).
const NEWS2_REFRESH_NS: i64 = 5_000_000_000;
/// The span of a device's message rate.
const RATE_WINDOW_NS: i64 = 60_000_000_000;

/// A value and when it was measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Value {
    pub v: f64,
    pub t_ns: TimestampNs,
}

/// A NEWS2 aggregate (RCP 2017) and when it was computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct News2 {
    pub score: u8,
    pub risk: Risk,
    pub t_ns: TimestampNs,
}

/// One patient's latest values.
#[derive(Debug, Clone, Default)]
pub struct Tile {
    pub values: [Option<Value>; Metric::COUNT],
    pub news2: Option<News2>,
    /// The devices that sent readings for the patient, with when.
    pub devices: Vec<(String, TimestampNs)>,
    /// Bumped by every change: streams send a tile again when it moves.
    pub version: u64,
}

impl Tile {
    /// When a device of the patient was last heard from.
    pub fn last_heard_ns(&self) -> Option<TimestampNs> {
        self.devices.iter().map(|(_, t)| *t).max()
    }
}

/// One device's contact.
#[derive(Debug, Clone, Default)]
pub struct DeviceStat {
    pub patient: Option<String>,
    pub last_seen_ns: Option<TimestampNs>,
    /// Publishes per second over the last minute: (second, count).
    recent: VecDeque<(i64, u32)>,
    /// Sequence numbers skipped and not received since.
    pub gaps: u64,
    max_seq: Option<u64>,
    pub dead_letters: u64,
    pub last_dead_reason: Option<&'static str>,
}

impl DeviceStat {
    /// Publishes in the minute before `now_ns`.
    pub fn rate_per_minute(&self, now_ns: TimestampNs) -> u64 {
        let from = (now_ns - RATE_WINDOW_NS) / 1_000_000_000;
        self.recent
            .iter()
            .filter(|(s, _)| *s > from)
            .map(|(_, n)| *n as u64)
            .sum()
    }

    fn on_publish(&mut self, at_ns: TimestampNs, patient: Option<&str>) {
        if self.patient.as_deref() != patient {
            self.patient = patient.map(str::to_string);
        }
        self.last_seen_ns = Some(self.last_seen_ns.map_or(at_ns, |t| t.max(at_ns)));
        let second = at_ns / 1_000_000_000;
        match self.recent.back_mut() {
            Some((s, n)) if *s == second => *n += 1,
            _ => self.recent.push_back((second, 1)),
        }
        let oldest = second - RATE_WINDOW_NS / 1_000_000_000;
        while self.recent.front().is_some_and(|(s, _)| *s <= oldest) {
            self.recent.pop_front();
        }
    }

    /// A reading's sequence number: a jump forward opens a gap, a late
    /// number fills one, and a number far behind with no gap open is the
    /// device restarting its counter.
    fn on_seq(&mut self, seq: u64) {
        match self.max_seq {
            None => self.max_seq = Some(seq),
            Some(max) if seq > max => {
                self.gaps += seq - max - 1;
                self.max_seq = Some(seq);
            }
            Some(max) if seq < max && self.gaps > 0 => self.gaps -= 1,
            Some(max) if seq < max => self.max_seq = Some(seq),
            Some(_) => {}
        }
    }

    fn merge(&mut self, d: DeviceStat) {
        self.patient = d.patient;
        self.last_seen_ns = self.last_seen_ns.max(d.last_seen_ns);
        for (s, n) in d.recent {
            match self.recent.iter_mut().find(|(x, _)| *x == s) {
                Some((_, m)) => *m += n,
                None => self.recent.push_back((s, n)),
            }
        }
        self.recent
            .make_contiguous()
            .sort_unstable_by_key(|(s, _)| *s);
        if let Some(last) = self.recent.back().map(|(s, _)| *s) {
            let oldest = last - RATE_WINDOW_NS / 1_000_000_000;
            self.recent.retain(|(s, _)| *s > oldest);
        }
        self.gaps = d.gaps;
        self.max_seq = d.max_seq;
        self.dead_letters += d.dead_letters;
        if d.last_dead_reason.is_some() {
            self.last_dead_reason = d.last_dead_reason;
        }
    }
}

/// The board of this process.
#[derive(Default)]
pub struct Board {
    inner: Mutex<Inner>,
    watchers: Mutex<Vec<tokio::sync::mpsc::Sender<()>>>,
}

#[derive(Default)]
struct Inner {
    version: u64,
    tiles: HashMap<String, Tile>,
    devices: HashMap<String, DeviceStat>,
}

impl Board {
    pub fn new() -> Arc<Board> {
        Arc::new(Board::default())
    }

    /// A wake-up after every publish (coalesced: one pending at most).
    pub fn watch(&self) -> tokio::sync::mpsc::Receiver<()> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        self.watchers.lock().push(tx);
        rx
    }

    /// The tiles of `patients` (copies).
    pub fn tiles<'a>(&self, patients: impl Iterator<Item = &'a str>) -> Vec<(String, Tile)> {
        let inner = self.inner.lock();
        patients
            .filter_map(|p| inner.tiles.get(p).map(|t| (p.to_string(), t.clone())))
            .collect()
    }

    /// One patient's tile.
    pub fn tile(&self, patient: &str) -> Option<Tile> {
        self.inner.lock().tiles.get(patient).cloned()
    }

    /// Every device's contact (copies).
    pub fn devices(&self) -> HashMap<String, DeviceStat> {
        self.inner.lock().devices.clone()
    }

    fn publish(&self, tiles: Vec<(String, TilePatch)>, devices: Vec<(String, DeviceStat)>) {
        if tiles.is_empty() && devices.is_empty() {
            return;
        }
        {
            let mut inner = self.inner.lock();
            inner.version += 1;
            let version = inner.version;
            for (p, patch) in tiles {
                let tile = inner.tiles.entry(p).or_default();
                let mut changed = false;
                for (m, v) in patch.values.iter().enumerate() {
                    if let Some(v) = v
                        && tile.values[m].is_none_or(|old| old.t_ns <= v.t_ns)
                    {
                        tile.values[m] = Some(*v);
                        changed = true;
                    }
                }
                if let Some(n) = patch.news2
                    && tile.news2.map(|o| (o.score, o.risk)) != n.map(|n| (n.score, n.risk))
                {
                    tile.news2 = n;
                    changed = true;
                }
                for (d, t) in patch.devices {
                    match tile.devices.iter_mut().find(|(x, _)| *x == d) {
                        Some((_, old)) => *old = (*old).max(t),
                        None => tile.devices.push((d, t)),
                    }
                    changed = true;
                }
                if changed {
                    tile.version = version;
                }
            }
            for (d, stat) in devices {
                inner.devices.entry(d).or_default().merge(stat);
            }
        }
        self.watchers.lock().retain(|w| {
            !matches!(
                w.try_send(()),
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_))
            )
        });
    }

    /// Forgets a patient (discharged).
    pub fn forget(&self, patient: &str) {
        self.inner.lock().tiles.remove(patient);
    }
}

/// What changed in one tile since the last publish.
#[derive(Default)]
struct TilePatch {
    values: [Option<Value>; Metric::COUNT],
    /// `Some(None)`: no NEWS2 any more (values aged out).
    news2: Option<Option<News2>>,
    devices: Vec<(String, TimestampNs)>,
}

/// One worker's changes, published to the board every [`PUBLISH_NS`].
pub struct BoardWriter {
    board: Arc<Board>,
    tiles: HashMap<String, TilePatch>,
    devices: HashMap<String, DeviceStat>,
    /// The devices' sequence state lives here between publishes (a device
    /// is exchanged to one worker, so this worker owns its counters).
    seqs: HashMap<String, (Option<u64>, u64)>,
    last_publish_ns: i64,
    last_news2_ns: i64,
}

impl BoardWriter {
    pub fn new(board: Arc<Board>) -> BoardWriter {
        BoardWriter {
            board,
            tiles: HashMap::new(),
            devices: HashMap::new(),
            seqs: HashMap::new(),
            last_publish_ns: 0,
            last_news2_ns: 0,
        }
    }

    /// One publish after validation. Allocates only for a device or
    /// patient not yet seen since the last publish.
    pub fn on_validated(&mut self, v: &Validated) {
        let device = v.device.as_str();
        if !self.devices.contains_key(device) {
            let (max_seq, gaps) = self.seqs.get(device).copied().unwrap_or_default();
            self.devices.insert(
                device.to_string(),
                DeviceStat {
                    max_seq,
                    gaps,
                    ..Default::default()
                },
            );
        }
        let stat = self.devices.get_mut(device).expect("inserted");
        stat.on_publish(v.received_ns, v.patient.as_ref().map(|p| p.as_str()));
        for r in v.readings.iter() {
            if let Some(s) = r.seq {
                stat.on_seq(s);
            }
        }
        for d in &v.dead {
            stat.dead_letters += 1;
            stat.last_dead_reason = Some(d.reason.code());
        }
        match self.seqs.get_mut(device) {
            Some(s) => *s = (stat.max_seq, stat.gaps),
            None => {
                self.seqs
                    .insert(device.to_string(), (stat.max_seq, stat.gaps));
            }
        }
        let Some(p) = &v.patient else {
            return;
        };
        if !self.tiles.contains_key(p.as_str()) {
            self.tiles
                .insert(p.as_str().to_string(), TilePatch::default());
        }
        let patch = self.tiles.get_mut(p.as_str()).expect("inserted");
        for r in v.readings.iter() {
            let m = r.metric as usize;
            if patch.values[m].is_none_or(|old| old.t_ns <= r.time_ns) {
                patch.values[m] = Some(Value {
                    v: r.value,
                    t_ns: r.time_ns,
                });
            }
        }
        match patch.devices.iter_mut().find(|(d, _)| d == device) {
            Some((_, t)) => *t = (*t).max(v.received_ns),
            None => patch.devices.push((device.to_string(), v.received_ns)),
        }
    }

    /// Forgets a patient (discharged): what this worker had not published
    /// yet, and the board's tile.
    pub fn forget(&mut self, patient: &str) {
        self.tiles.remove(patient);
        self.board.forget(patient);
    }

    /// Time passes; publishes when due. `news2` scores a patient now.
    pub fn on_time<'a>(
        &mut self,
        now_ns: i64,
        patients: impl Iterator<Item = &'a str>,
        news2: impl Fn(&str) -> Option<News2>,
    ) {
        if now_ns - self.last_publish_ns < PUBLISH_NS {
            return;
        }
        self.last_publish_ns = now_ns;
        if now_ns - self.last_news2_ns >= NEWS2_REFRESH_NS {
            self.last_news2_ns = now_ns;
            for p in patients {
                self.tiles.entry(p.to_string()).or_default();
            }
        }
        let mut tiles: Vec<(String, TilePatch)> = self.tiles.drain().collect();
        for (p, patch) in &mut tiles {
            patch.news2 = Some(news2(p));
        }
        let devices: Vec<(String, DeviceStat)> = self.devices.drain().collect();
        self.board.publish(tiles, devices);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_gaps_open_and_fill() {
        let mut d = DeviceStat::default();
        for s in [1, 2, 3, 6, 7] {
            d.on_seq(s);
        }
        assert_eq!(d.gaps, 2, "4 and 5 are missing");
        d.on_seq(4);
        assert_eq!(d.gaps, 1);
        d.on_seq(5);
        assert_eq!(d.gaps, 0);
        // A restarted counter is not a gap.
        d.on_seq(0);
        d.on_seq(1);
        assert_eq!(d.gaps, 0);
    }

    #[test]
    fn rate_counts_the_last_minute() {
        let mut d = DeviceStat::default();
        let s = 1_000_000_000i64;
        for i in 0..120 {
            d.on_publish(i * s, None);
        }
        assert_eq!(d.rate_per_minute(119 * s), 60);
        assert_eq!(d.rate_per_minute(300 * s), 0);
    }

    #[test]
    fn publish_keeps_the_newest_value_and_bumps_versions() {
        let board = Board::new();
        let mut wake = board.watch();
        let mut patch = TilePatch::default();
        patch.values[Metric::Hr as usize] = Some(Value { v: 80.0, t_ns: 10 });
        board.publish(vec![("p-1".into(), patch)], Vec::new());
        assert!(wake.try_recv().is_ok());
        let v1 = board.tile("p-1").unwrap().version;
        // An older value does not replace a newer one, nor move the tile.
        let mut old = TilePatch::default();
        old.values[Metric::Hr as usize] = Some(Value { v: 70.0, t_ns: 5 });
        board.publish(vec![("p-1".into(), old)], Vec::new());
        let t = board.tile("p-1").unwrap();
        assert_eq!(t.values[Metric::Hr as usize].unwrap().v, 80.0);
        assert_eq!(t.version, v1);
    }
}
