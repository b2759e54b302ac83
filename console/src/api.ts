// Same-origin calls to the engine's console API; sign-in lives in an HTTP-only cookie.
import type { AccessRow, Alert, Consent, Device, Me, Trend } from './types';

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly body: Record<string, unknown> | null,
  ) {
    super(message);
  }
}

let unauthorized: (() => void) | null = null;

/** Called when a call answers 401 (signed out or expired), except the sign-in calls themselves. */
export function onUnauthorized(fn: (() => void) | null) {
  unauthorized = fn;
}

async function request<T>(method: 'GET' | 'POST', path: string, body?: unknown): Promise<T> {
  const init: RequestInit = { method, credentials: 'same-origin', headers: { Accept: 'application/json' } };
  if (method === 'POST') {
    init.headers = { ...init.headers, 'Content-Type': 'application/json' };
    init.body = JSON.stringify(body ?? {});
  }
  let res: Response;
  try {
    res = await fetch(path, init);
  } catch {
    throw new ApiError(0, 'The engine cannot be reached.', null);
  }
  let json: unknown = null;
  const text = await res.text();
  if (text) {
    try {
      json = JSON.parse(text);
    } catch {
      json = null;
    }
  }
  if (!res.ok) {
    const obj = json && typeof json === 'object' ? (json as Record<string, unknown>) : null;
    const msg = typeof obj?.error === 'string' ? obj.error : `${res.status} ${res.statusText}`;
    if (res.status === 401 && !/\/v1\/console\/(login|challenge|me)$/.test(path.split('?')[0])) unauthorized?.();
    throw new ApiError(res.status, msg, obj);
  }
  return json as T;
}

const enc = encodeURIComponent;

export type LoginBody =
  | { role: 'clinician' | 'admin'; id: string; secret: string }
  | { role: 'patient'; patient: string; challenge: string; signature: string }
  | { role: 'patient'; patient: string; token: string };

export type ConsentPrepare =
  | { op: 'revoke'; grant: string }
  | { op: 'grant'; grantee: string; purpose: string; scope: string[]; days: number };

export const api = {
  me: () => request<Me>('GET', '/v1/console/me'),
  challenge: (patient: string) =>
    request<{ challenge: string }>('GET', `/v1/console/challenge?patient=${enc(patient)}`),
  login: (body: LoginBody) => request<Me>('POST', '/v1/console/login', body),
  logout: () => request<unknown>('POST', '/v1/console/logout', {}),
  ack: (id: string) => request<Alert>('POST', `/v1/console/alerts/${enc(id)}/ack`, {}),
  silence: (id: string, seconds = 120) =>
    request<Alert>('POST', `/v1/console/alerts/${enc(id)}/silence?seconds=${seconds}`, {}),
  trend: (patient: string, hours: number) =>
    request<Trend>('GET', `/v1/console/patients/${enc(patient)}/trend?hours=${hours}`),
  devices: () => request<Device[]>('GET', '/v1/console/devices'),
  consents: () => request<Consent[]>('GET', '/v1/console/me/consents'),
  prepareConsent: (body: ConsentPrepare) =>
    request<{ payload: string; summary: string }>('POST', '/v1/console/me/consents/prepare', body),
  submitConsent: (payload: string, signature: string) =>
    request<{ id: string }>('POST', '/v1/console/me/consents', { payload, signature }),
  access: () => request<AccessRow[]>('GET', '/v1/console/me/access'),
};
