// The one live connection: an EventSource on /v1/console/stream. Events are folded into
// pending maps and committed at most once per animation frame, so many beds updating every
// second cost one render per frame; unchanged tiles keep their object identity.
import { createContext, useContext, useSyncExternalStore } from 'react';
import type { Alert, Device, Me, Tile } from './types';

/** Alert ids remembered at most (open ones always are). */
const MAX_REMEMBERED = 2000;

export type Connection = 'connecting' | 'open' | 'reconnecting' | 'closed';

export type Snapshot = {
  tiles: ReadonlyMap<string, Tile>;
  alerts: ReadonlyMap<string, Alert>;
  devices: Device[] | null;
  connection: Connection;
  /** Patients whose view ended (a consent ran out) since they were last seen. */
  lost: ReadonlySet<string>;
};

export type AlertListener = (alert: Alert, previous: Alert | undefined) => void;
export type TileListener = (tile: Tile) => void;

export class LiveStore {
  private snap: Snapshot = {
    tiles: new Map(),
    alerts: new Map(),
    devices: null,
    connection: 'connecting',
    lost: new Set(),
  };
  private source: EventSource | null = null;
  private frame = 0;
  private reset = false;
  private pendingTiles = new Map<string, Tile>();
  private pendingAlerts = new Map<string, Alert>();
  private pendingLost: string[] = [];
  private pendingDevices: Device[] | null = null;
  private pendingConnection: Connection | null = null;
  /** Highest seq seen per alert id, resolved ones included, so late events are dropped. */
  private seqs = new Map<string, number>();
  private current = new Map<string, Alert>();
  private listeners = new Set<() => void>();
  private alertListeners = new Set<AlertListener>();
  private tileListeners = new Set<TileListener>();
  private retry: number | undefined;

  constructor(
    private readonly url = '/v1/console/stream',
    private readonly onClosed?: () => void,
    private readonly onHello?: (me: Me) => void,
  ) {}

  subscribe = (fn: () => void) => {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  };
  getSnapshot = () => this.snap;

  onAlert(fn: AlertListener) {
    this.alertListeners.add(fn);
    return () => void this.alertListeners.delete(fn);
  }
  onTile(fn: TileListener) {
    this.tileListeners.add(fn);
    return () => void this.tileListeners.delete(fn);
  }

  connect() {
    this.close();
    const es = new EventSource(this.url);
    this.source = es;
    this.setConnection('connecting');
    es.onopen = () => this.setConnection('open');
    es.onerror = () => {
      if (es.readyState === EventSource.CONNECTING) {
        this.setConnection('reconnecting');
      } else if (es.readyState === EventSource.CLOSED) {
        // The browser gave up (e.g. a non-200 answer): let the app check the sign-in.
        this.setConnection('closed');
        this.onClosed?.();
      }
    };
    es.addEventListener('hello', (e) => {
      // A (re)connection sends every tile and open alert again: start from a clean slate.
      this.reset = true;
      this.pendingTiles.clear();
      this.pendingAlerts.clear();
      this.current = new Map();
      const me = parse<Me>(e);
      if (me) this.onHello?.(me);
      this.schedule();
    });
    es.addEventListener('tile', (e) => {
      const t = parse<Tile>(e);
      if (t) this.applyTile(t);
    });
    es.addEventListener('alert', (e) => {
      const a = parse<Alert>(e);
      if (a) this.applyAlert(a);
    });
    es.addEventListener('devices', (e) => {
      const d = parse<Device[]>(e);
      if (d) {
        this.pendingDevices = d;
        this.schedule();
      }
    });
    es.addEventListener('access', (e) => {
      const a = parse<{ patient: string; lost: boolean }>(e);
      if (a?.lost) {
        this.pendingTiles.delete(a.patient);
        this.pendingLost.push(a.patient);
        for (const [id, al] of this.current) if (al.patient === a.patient) this.current.delete(id);
        this.schedule();
      }
    });
  }

  /** Reconnect later, after the browser gave up. */
  reconnectSoon(ms = 3000) {
    window.clearTimeout(this.retry);
    this.retry = window.setTimeout(() => this.connect(), ms);
  }

  close() {
    window.clearTimeout(this.retry);
    this.source?.close();
    this.source = null;
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = 0;
  }

  /** Also used for the answers of ack / silence, which carry the alert's new state. */
  applyAlert(a: Alert) {
    const seen = this.seqs.get(a.id);
    if (seen !== undefined && a.seq < seen) return;
    this.seqs.set(a.id, a.seq);
    const previous = this.current.get(a.id);
    if (a.state === 'resolved') {
      this.current.delete(a.id);
      this.forgetResolved();
    } else this.current.set(a.id, a);
    this.pendingAlerts.set(a.id, a);
    for (const fn of this.alertListeners) fn(a, previous);
    this.schedule();
  }

  /**
   * Keeps the memory of resolved alerts bounded over a long shift: past a
   * limit, the oldest resolved ids are forgotten (a stream delivers an
   * alert's transitions in order, so only a stray late event could need them).
   */
  private forgetResolved() {
    if (this.seqs.size <= MAX_REMEMBERED) return;
    for (const id of this.seqs.keys()) {
      if (this.seqs.size <= MAX_REMEMBERED / 2) break;
      if (!this.current.has(id)) this.seqs.delete(id);
    }
  }

  private applyTile(t: Tile) {
    this.pendingTiles.set(t.patient, t);
    for (const fn of this.tileListeners) fn(t);
    this.schedule();
  }

  /** Open alerts right now (not waiting for the next frame), for the sound cues. */
  openAlerts(): Iterable<Alert> {
    return this.current.values();
  }

  private setConnection(c: Connection) {
    this.pendingConnection = c;
    this.schedule();
  }

  private schedule() {
    if (!this.frame) this.frame = requestAnimationFrame(this.commit);
  }

  private commit = () => {
    this.frame = 0;
    const s = this.snap;
    let tiles = s.tiles;
    let alerts = s.alerts;
    let lost = s.lost;
    if (this.reset || this.pendingTiles.size || this.pendingLost.length) {
      const next = this.reset ? new Map<string, Tile>() : new Map(s.tiles);
      for (const p of this.pendingLost) next.delete(p);
      for (const [k, t] of this.pendingTiles) next.set(k, t);
      tiles = next;
    }
    if (this.reset || this.pendingAlerts.size || this.pendingLost.length) {
      alerts = new Map(this.current);
    }
    if (this.pendingLost.length || this.pendingTiles.size) {
      const next = new Set(s.lost);
      for (const p of this.pendingLost) next.add(p);
      for (const p of this.pendingTiles.keys()) next.delete(p);
      if (next.size !== s.lost.size || [...next].some((p) => !s.lost.has(p))) lost = next;
    }
    const devices = this.pendingDevices ?? s.devices;
    const connection = this.pendingConnection ?? s.connection;
    this.reset = false;
    this.pendingTiles.clear();
    this.pendingAlerts.clear();
    this.pendingLost = [];
    this.pendingDevices = null;
    this.pendingConnection = null;
    if (
      tiles === s.tiles && alerts === s.alerts && lost === s.lost &&
      devices === s.devices && connection === s.connection
    ) return;
    this.snap = { tiles, alerts, devices, connection, lost };
    for (const fn of this.listeners) fn();
  };
}

function parse<T>(e: Event): T | null {
  try {
    return JSON.parse((e as MessageEvent<string>).data) as T;
  } catch {
    return null;
  }
}

export const LiveContext = createContext<LiveStore | null>(null);

export function useStore(): LiveStore {
  const s = useContext(LiveContext);
  if (!s) throw new Error('LiveStore missing');
  return s;
}

export function useLive(): Snapshot {
  const store = useStore();
  return useSyncExternalStore(store.subscribe, store.getSnapshot);
}
