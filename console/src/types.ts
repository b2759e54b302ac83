// JSON shapes of the console API (docs/console.md).

export type Role = 'clinician' | 'admin' | 'patient';
export type Priority = 'high' | 'medium' | 'low';

export type Me = { role: Role; id: string; units: string[]; patient: string | null };

export type Value = { v: number; t: number; stale: boolean };
export type Metric = 'hr' | 'spo2' | 'rr' | 'sbp' | 'dbp' | 'temp';

export type Tile = {
  patient: string;
  unit: string;
  bed: string;
  devices: string[];
  values: Partial<Record<Metric, Value>>;
  news2: { score: number; risk: 'low' | 'low-medium' | 'medium' | 'high'; t: number } | null;
  offline: boolean;
  alarm: Priority | null;
  via: 'unit' | 'consent' | 'emergency' | 'own' | 'admin';
};

export type AlertState = 'active' | 'acknowledged' | 'silenced' | 'resolved' | 'escalated';

export type Alert = {
  id: string;
  seq: number;
  event: string;
  state: AlertState;
  subject: string;
  subject_kind: 'patient' | 'device';
  patient: string | null;
  device: string | null;
  unit: string | null;
  bed: string | null;
  rule: string;
  description: string;
  priority: Priority;
  base_priority: string;
  technical: boolean;
  tier: number;
  latching: boolean;
  condition: boolean;
  values: { name: string; value: number; time_ns: number; note?: string }[];
  first_reading_ns: number;
  raised_ns: number;
  at_ns: number;
  by?: string;
  silenced_until_ns?: number;
  escalate_after_ns?: number;
};

export type Series = { t: number[]; v: number[] };

export type Observation = {
  t: number;
  consciousness: string | null;
  oxygen: string | null;
  spo2_scale: number | null;
  by: string;
};

export type Trend = {
  patient: string;
  from: number;
  to: number;
  series: Partial<Record<Metric, Series>>;
  news2: Series;
  alerts: Alert[];
  observations: Observation[];
  withheld: string[];
};

export type DeviceStatus = 'online' | 'offline' | 'never-seen' | 'unbound';

export type Device = {
  device: string;
  patient: string | null;
  unit: string | null;
  bed: string | null;
  status: DeviceStatus;
  last_seen: number | null;
  rate: number;
  gaps: number;
  dead_letters: number;
  last_dead_reason: string | null;
};

export type Consent = {
  id: string;
  grantee: string;
  purpose: string;
  scope: string[];
  not_after: number;
  may_delegate: boolean;
  parent: string | null;
  block: number;
  recorded: number;
  revoked: boolean;
  in_force: boolean;
};

export type AccessRow = {
  at: number;
  actor: string;
  action: string;
  purpose: string;
  detail: string;
  proof: string;
};

export const PRIORITY_RANK: Record<Priority, number> = { high: 3, medium: 2, low: 1 };
