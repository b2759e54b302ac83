// A patient's trends over 1, 8 or 24 hours, with alert transitions and observations marked on
// every chart. Live tile values from the stream are appended in place (no refetch).
import { useCallback, useEffect, useMemo, useRef, useState } from 'react';
import type uPlot from 'uplot';
import { api, ApiError } from '../api';
import { PriorityBadge } from '../components/Badges';
import { Tile } from '../components/Tile';
import { TrendChart, type Marker, type SeriesDef } from '../components/TrendChart';
import { clock, dateTime, nsToMs } from '../format';
import { useLive, useStore } from '../stream';
import type { Alert, Metric, Observation, Series, Tile as TileT, Trend } from '../types';
import { Table } from '../components/Table';

type ChartKey = 'hr' | 'spo2' | 'rr' | 'bp' | 'temp' | 'news2';
type Source = Metric | 'news2';

type ChartSpec = { key: ChartKey; title: string; unit: string; digits: number; series: (SeriesDef & { src: Source })[] };

const CHARTS: ChartSpec[] = [
  { key: 'hr', title: 'Heart rate', unit: '/min', digits: 0, series: [{ label: 'HR', color: '#4ade80', src: 'hr' }] },
  { key: 'spo2', title: 'SpO₂', unit: '%', digits: 0, series: [{ label: 'SpO₂', color: '#60a5fa', src: 'spo2' }] },
  { key: 'rr', title: 'Respiration rate', unit: '/min', digits: 0, series: [{ label: 'RR', color: '#fbbf24', src: 'rr' }] },
  {
    key: 'bp',
    title: 'Blood pressure',
    unit: 'mmHg',
    digits: 0,
    series: [
      { label: 'Systolic', color: '#f87171', src: 'sbp' },
      { label: 'Diastolic', color: '#fca5a5', src: 'dbp' },
    ],
  },
  { key: 'temp', title: 'Temperature', unit: '°C', digits: 1, series: [{ label: 'Temp', color: '#c084fc', src: 'temp' }] },
  { key: 'news2', title: 'NEWS2', unit: 'score', digits: 0, series: [{ label: 'NEWS2', color: '#f0f0f0', src: 'news2' }] },
];

const PRIORITY_COLOR = { high: '#ff5c5c', medium: '#ffc400', low: '#22d3ee' } as const;
const OBSERVATION_COLOR = '#e879f9';
const HOURS = [1, 8, 24] as const;

/** Columns in uPlot's layout, seconds on x; arrays grow in place as live values arrive. */
type Columns = { xs: number[]; ys: (number | null)[][]; aligned: uPlot.AlignedData };

/** Merges series with their own timestamps into one x column (nulls where a series has no point). */
function merge(list: (Series | undefined)[]): Columns {
  const n = list.length;
  const idx = new Array<number>(n).fill(0);
  const xs: number[] = [];
  const ys: (number | null)[][] = list.map(() => []);
  for (;;) {
    let next = Infinity;
    for (let k = 0; k < n; k++) {
      const s = list[k];
      if (s && idx[k] < s.t.length && s.t[idx[k]] < next) next = s.t[idx[k]];
    }
    if (next === Infinity) break;
    xs.push(next / 1000);
    for (let k = 0; k < n; k++) {
      const s = list[k];
      if (s && idx[k] < s.t.length && s.t[idx[k]] === next) ys[k].push(s.v[idx[k]++]);
      else ys[k].push(null);
    }
  }
  return { xs, ys, aligned: [xs, ...ys] as uPlot.AlignedData };
}

/** Appends a point at `tMs` for series `k`; ignores anything not newer than the last row. */
function append(c: Columns, k: number, tMs: number, v: number): boolean {
  const x = tMs / 1000;
  const last = c.xs.length ? c.xs[c.xs.length - 1] : -Infinity;
  if (x < last) return false;
  if (x === last) {
    if (c.ys[k][c.ys[k].length - 1] === v) return false;
    c.ys[k][c.ys[k].length - 1] = v;
    return true;
  }
  c.xs.push(x);
  c.ys.forEach((col, j) => col.push(j === k ? v : null));
  return true;
}

function sourceValue(tile: TileT, src: Source): { v: number; t: number } | null {
  if (src === 'news2') return tile.news2 ? { v: tile.news2.score, t: tile.news2.t } : null;
  const val = tile.values[src];
  return val ? { v: val.v, t: val.t } : null;
}

type Loaded = { gen: number; trend: Trend; columns: Map<ChartKey, Columns> };

let generation = 0;

function build(trend: Trend): Loaded {
  const columns = new Map<ChartKey, Columns>();
  for (const spec of CHARTS) {
    const list = spec.series.map((s) => (s.src === 'news2' ? trend.news2 : trend.series[s.src]));
    columns.set(spec.key, merge(list));
  }
  return { gen: ++generation, trend, columns };
}

function alertMarker(a: Alert): Marker {
  return { t: a.at_ns / 1e9, color: PRIORITY_COLOR[a.priority], label: `${a.rule} ${a.event}` };
}

function observationMarker(o: Observation): Marker {
  return { t: o.t / 1000, color: OBSERVATION_COLOR, dashed: true, label: `observation by ${o.by}` };
}

export function PatientPage({ patient }: { patient: string }) {
  const store = useStore();
  const { tiles, lost } = useLive();
  const tile = tiles.get(patient);
  const [hours, setHours] = useState<number>(1);
  const [loaded, setLoaded] = useState<Loaded | null>(null);
  const [error, setError] = useState<{ denied: boolean; message: string } | null>(null);
  const [loading, setLoading] = useState(false);
  const [range, setRange] = useState<[number, number]>([0, 1]);
  const [liveAlerts, setLiveAlerts] = useState<Alert[]>([]);
  // Per-chart counters bumped when live values were appended in place.
  const [versions, setVersions] = useState<Record<string, number>>({});
  const dirty = useRef(new Set<ChartKey>());
  const frame = useRef(0);
  const latest = useRef(0);

  const load = useCallback(
    (h: number) => {
      setLoading(true);
      setError(null);
      api.trend(patient, h).then(
        (trend) => {
          const l = build(trend);
          setLoaded(l);
          setLiveAlerts([]);
          latest.current = trend.to;
          setRange([(trend.to - h * 3600_000) / 1000, trend.to / 1000]);
          setLoading(false);
        },
        (e: unknown) => {
          setLoaded(null);
          setLoading(false);
          setError({
            denied: e instanceof ApiError && e.status === 403,
            message: e instanceof Error ? e.message : String(e),
          });
        },
      );
    },
    [patient],
  );

  useEffect(() => load(hours), [load, hours]);

  // Live values: append to the loaded columns, redraw at most once per frame.
  const appendTile = useCallback(
    (t: TileT) => {
      if (!loaded || t.patient !== patient) return;
      let newest = latest.current;
      for (const spec of CHARTS) {
        const cols = loaded.columns.get(spec.key)!;
        spec.series.forEach((s, k) => {
          const val = sourceValue(t, s.src);
          if (val && append(cols, k, val.t, val.v)) {
            dirty.current.add(spec.key);
            newest = Math.max(newest, val.t);
          }
        });
      }
      latest.current = newest;
      if (dirty.current.size && !frame.current) {
        frame.current = requestAnimationFrame(() => {
          frame.current = 0;
          const keys = [...dirty.current];
          dirty.current.clear();
          setVersions((v) => {
            const next = { ...v };
            for (const k of keys) next[k] = (next[k] ?? 0) + 1;
            return next;
          });
          const to = latest.current / 1000;
          setRange((r) => (to > r[1] ? [to - hours * 3600, to] : r));
        });
      }
    },
    [loaded, patient, hours],
  );

  useEffect(() => {
    if (!loaded) return;
    const current = store.getSnapshot().tiles.get(patient);
    if (current) appendTile(current);
    const offTile = store.onTile(appendTile);
    const offAlert = store.onAlert((a) => {
      if (a.patient === patient) setLiveAlerts((l) => [...l, a]);
    });
    return () => {
      offTile();
      offAlert();
      cancelAnimationFrame(frame.current);
      frame.current = 0;
    };
  }, [loaded, store, patient, appendTile]);

  const alerts = useMemo(() => {
    if (!loaded) return [];
    const seen = new Set(loaded.trend.alerts.map((a) => `${a.id}:${a.seq}`));
    return [...loaded.trend.alerts, ...liveAlerts.filter((a) => !seen.has(`${a.id}:${a.seq}`))].sort(
      (a, b) => a.at_ns - b.at_ns,
    );
  }, [loaded, liveAlerts]);

  const markers = useMemo(
    () => [...alerts.map(alertMarker), ...(loaded?.trend.observations ?? []).map(observationMarker)],
    [alerts, loaded],
  );

  const present = loaded
    ? CHARTS.filter((spec) => spec.key === 'news2' || loaded.columns.get(spec.key)!.xs.length > 0 ||
        (tile && spec.series.some((s) => sourceValue(tile, s.src))))
    : [];

  return (
    <section data-testid={`patient-${patient}`} aria-labelledby="patient-title">
      <div className="page-head">
        <h1 id="patient-title">
          Patient {patient}
          {tile && (
            <span className="muted small">
              {' '}
              {tile.unit} · bed {tile.bed}
            </span>
          )}
        </h1>
        <div className="range" role="group" aria-label="Time range">
          {HOURS.map((h) => (
            <button
              key={h}
              type="button"
              data-testid={`range-${h}`}
              aria-pressed={hours === h}
              onClick={() => (h === hours ? load(h) : setHours(h))}
            >
              {h} h
            </button>
          ))}
        </div>
      </div>

      {lost.has(patient) && (
        <p className="error-box" role="alert" data-testid="access-denied">
          Your access to this patient's data has ended.
        </p>
      )}
      {error &&
        (error.denied ? (
          <p className="error-box" role="alert" data-testid="access-denied">
            Access denied: {error.message}
          </p>
        ) : (
          <p className="error-box" role="alert">
            Could not load the trend: {error.message}
          </p>
        ))}

      {tile && (
        <div className="tiles single">
          <Tile tile={tile} />
        </div>
      )}

      {loading && !loaded && <p className="muted">Loading…</p>}

      {loaded && (
        <>
          <p className="muted small legend">
            {clock(range[0] * 1000)} – {clock(range[1] * 1000)} · vertical lines: alert transitions (coloured by
            priority) and manual observations (dashed)
          </p>
          {loaded.trend.withheld.length > 0 && (
            <div className="notice">
              <strong>Withheld:</strong>
              <ul>
                {loaded.trend.withheld.map((w, i) => (
                  <li key={i}>{w}</li>
                ))}
              </ul>
            </div>
          )}
          <div className="charts">
            {present.map((spec) => {
              const cols = loaded.columns.get(spec.key)!;
              return (
                <TrendChart
                  key={`${loaded.gen}-${spec.key}`}
                  testid={`chart-${spec.key}`}
                  title={spec.title}
                  unit={spec.unit}
                  digits={spec.digits}
                  series={spec.series}
                  data={cols.aligned}
                  version={versions[spec.key] ?? 0}
                  range={range}
                  markers={markers}
                />
              );
            })}
          </div>
          <PatientAlerts alerts={alerts} />
          <Observations list={loaded.trend.observations} />
        </>
      )}
    </section>
  );
}

function PatientAlerts({ alerts }: { alerts: Alert[] }) {
  return (
    <section aria-labelledby="p-alerts">
      <h2 id="p-alerts">Alert transitions</h2>
      {alerts.length === 0 ? (
        <p className="muted">None in this range.</p>
      ) : (
        <Table columns={['Time', 'Event', 'State', 'Priority', 'Rule', 'By']}>
          {alerts.map((a) => (
            <tr key={`${a.id}:${a.seq}`}>
              <td>{dateTime(nsToMs(a.at_ns))}</td>
              <td>
                {a.event}
                {a.event === 'escalated' && <span className="badge badge-escalated">tier {a.tier}</span>}
              </td>
              <td>{a.state}</td>
              <td>
                <PriorityBadge p={a.priority} />
              </td>
              <td>
                <strong>{a.rule}</strong> <span className="small">{a.description}</span>
              </td>
              <td>{a.by ?? '–'}</td>
            </tr>
          ))}
        </Table>
      )}
    </section>
  );
}

function Observations({ list }: { list: Observation[] }) {
  return (
    <section aria-labelledby="p-obs">
      <h2 id="p-obs">Manual observations</h2>
      {list.length === 0 ? (
        <p className="muted">None in this range.</p>
      ) : (
        <Table columns={['Time', 'Consciousness', 'Oxygen', 'SpO₂ scale', 'By']}>
          {list.map((o, i) => (
            <tr key={i}>
              <td>{dateTime(o.t)}</td>
              <td>{o.consciousness ?? '–'}</td>
              <td>{o.oxygen ?? '–'}</td>
              <td>{o.spo2_scale ?? '–'}</td>
              <td>{o.by}</td>
            </tr>
          ))}
        </Table>
      )}
    </section>
  );
}
