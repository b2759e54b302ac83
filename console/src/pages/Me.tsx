// My data (patients): own vitals, consents (grant, revoke: signed in the page with the
// patient's key), and the access log of their data.
import { useCallback, useEffect, useState } from 'react';
import { api, ApiError, type ConsentPrepare } from '../api';
import { Tile } from '../components/Tile';
import { hexToBytes, parseKey, signBytes } from '../crypto';
import { dateTime } from '../format';
import { patientHref } from '../router';
import { useAuth } from '../auth';
import { useLive } from '../stream';
import type { AccessRow, Consent } from '../types';
import { Table } from '../components/Table';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const errText = (e: unknown) => (e instanceof Error ? e.message : String(e));

/** `not_after` as ms; tolerates seconds. */
const asMs = (t: number) => (t < 1e11 ? t * 1000 : t);

export function MePage() {
  const { me } = useAuth();
  const { tiles } = useLive();
  const own = [...tiles.values()].filter((t) => me.role !== 'patient' || !me.patient || t.patient === me.patient);

  if (me.role !== 'patient') {
    return (
      <section>
        <h1>My data</h1>
        <p className="muted">This page is for patients.</p>
      </section>
    );
  }

  return (
    <section aria-labelledby="me-title">
      <h1 id="me-title">My data</h1>
      <section aria-labelledby="me-vitals">
        <h2 id="me-vitals">My vitals</h2>
        {own.length === 0 ? (
          <p className="muted">No current readings.</p>
        ) : (
          <div className="tiles">
            {own.map((t) => (
              <Tile key={t.patient} tile={t} />
            ))}
          </div>
        )}
        {me.patient && (
          <p>
            <a href={patientHref(me.patient)}>See my trends</a>
          </p>
        )}
      </section>
      <Consents />
      <AccessLog />
    </section>
  );
}

type Pending = { body: ConsentPrepare; done: (list: Consent[], before: Consent[]) => boolean };

function Consents() {
  const { getKey, setKey } = useAuth();
  const [list, setList] = useState<Consent[] | null>(null);
  const [loadError, setLoadError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const [message, setMessage] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [cli, setCli] = useState<{ command: string; summary: string; error: string } | null>(null);
  const [awaitingKey, setAwaitingKey] = useState<Pending | null>(null);

  const refresh = useCallback(async () => {
    try {
      const l = await api.consents();
      setList(l);
      setLoadError(null);
      return l;
    } catch (e) {
      setLoadError(errText(e));
      return null;
    }
  }, []);

  useEffect(() => {
    void refresh();
  }, [refresh]);

  const run = useCallback(
    async (p: Pending) => {
      const key = getKey();
      if (!key) {
        setAwaitingKey(p);
        return;
      }
      setAwaitingKey(null);
      setBusy(true);
      setMessage(null);
      setError(null);
      setCli(null);
      const before = list ?? [];
      try {
        const prep = await api.prepareConsent(p.body);
        const signature = signBytes(key, hexToBytes(prep.payload));
        try {
          const res = await api.submitConsent(prep.payload, signature);
          setMessage(`Signed: ${prep.summary}${res?.id ? ` (record ${res.id})` : ''}`);
        } catch (e) {
          // With a chain configured, the record goes in from the patient's wallet instead.
          if (e instanceof ApiError && e.status === 409 && typeof e.body?.cli === 'string') {
            setCli({ command: e.body.cli, summary: prep.summary, error: e.message });
            return;
          }
          throw e;
        }
        // The engine applies the record asynchronously: look again a few times.
        for (let i = 0; i < 6; i++) {
          const l = await refresh();
          if (l && p.done(l, before)) break;
          await sleep(500);
        }
      } catch (e) {
        setError(errText(e));
      } finally {
        setBusy(false);
      }
    },
    [getKey, list, refresh],
  );

  const revoke = (grant: string) =>
    run({
      body: { op: 'revoke', grant },
      done: (l) => {
        const c = l.find((x) => x.id === grant);
        return !c || c.revoked || !c.in_force;
      },
    });

  return (
    <section aria-labelledby="me-consents">
      <h2 id="me-consents">Consents</h2>
      {loadError && (
        <p className="error" role="alert">
          {loadError}
        </p>
      )}
      {list && list.length === 0 && <p className="muted">No consents recorded.</p>}
      {list && list.length > 0 && (
        <Table columns={['Grant', 'Grantee', 'Purpose', 'Scope', 'Until', 'Recorded', 'Status', 'Action']}>
          {list.map((c) => (
            <tr
              key={c.id}
              data-testid={`consent-${c.id}`}
              data-revoked={String(c.revoked)}
              data-in-force={String(c.in_force)}
            >
              <th scope="row" className="mono small">
                {c.id}
                {c.parent && <div className="muted">from {c.parent}</div>}
              </th>
              <td>
                {c.grantee}
                {c.may_delegate && <div className="small muted">may delegate</div>}
              </td>
              <td>{c.purpose}</td>
              <td>{c.scope.join(', ')}</td>
              <td>{dateTime(asMs(c.not_after))}</td>
              <td>
                {dateTime(c.recorded)}
                <div className="small muted">block {c.block}</div>
              </td>
              <td>
                <span className={`badge ${c.in_force ? 'status-online' : 'status-offline'}`}>
                  {c.revoked ? 'revoked' : c.in_force ? 'in force' : 'not in force'}
                </span>
              </td>
              <td>
                {c.in_force && !c.revoked && (
                  <button type="button" data-testid={`revoke-${c.id}`} disabled={busy} onClick={() => revoke(c.id)}>
                    Revoke
                  </button>
                )}
              </td>
            </tr>
          ))}
        </Table>
      )}

      {awaitingKey && (
        <KeyPrompt
          onKey={(text) => {
            const k = parseKey(text);
            setKey(k);
            void run(awaitingKey);
          }}
          onCancel={() => setAwaitingKey(null)}
        />
      )}
      <div aria-live="polite">
        {busy && <p className="muted">Signing and submitting…</p>}
        {message && <p className="ok">{message}</p>}
      </div>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      {cli && (
        <div className="notice" role="status">
          <p>
            {cli.error} Submit it from your wallet with this command ({cli.summary}):
          </p>
          <pre className="cli" data-testid="consent-cli">
            <code>{cli.command}</code>
          </pre>
          <button type="button" onClick={() => void navigator.clipboard?.writeText(cli.command)}>
            Copy command
          </button>
        </div>
      )}

      <GrantForm
        busy={busy}
        onGrant={(body) =>
          run({
            body,
            done: (l, before) => l.length > before.length,
          })
        }
      />
    </section>
  );
}

function KeyPrompt({ onKey, onCancel }: { onKey: (text: string) => void; onCancel: () => void }) {
  const [text, setText] = useState('');
  const [error, setError] = useState<string | null>(null);
  return (
    <form
      className="key-prompt"
      onSubmit={(e) => {
        e.preventDefault();
        try {
          onKey(text);
        } catch (err) {
          setError(errText(err));
        }
      }}
    >
      <p>Signing needs your key. It stays in this page and is forgotten when you reload or log out.</p>
      <label htmlFor="consent-key">Your key</label>
      <textarea
        id="consent-key"
        data-testid="consent-key"
        rows={2}
        spellCheck={false}
        autoComplete="off"
        placeholder="0x… (the secret URI from your key file)"
        value={text}
        onChange={(e) => setText(e.target.value)}
      />
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      <div className="actions">
        <button type="submit" className="primary">
          Sign
        </button>
        <button type="button" onClick={onCancel}>
          Cancel
        </button>
      </div>
    </form>
  );
}

const SCOPES = ['vitals', 'alerts', 'observations', 'all'] as const;

function GrantForm({ busy, onGrant }: { busy: boolean; onGrant: (b: ConsentPrepare) => void }) {
  const [grantee, setGrantee] = useState('');
  const [purpose, setPurpose] = useState<'treatment' | 'emergency' | 'research'>('treatment');
  const [study, setStudy] = useState('');
  const [scope, setScope] = useState<string[]>(['vitals']);
  const [days, setDays] = useState(30);
  const [error, setError] = useState<string | null>(null);

  function submit(e: React.FormEvent) {
    e.preventDefault();
    setError(null);
    if (!grantee.trim()) return setError('Name who the grant is for.');
    if (purpose === 'research' && !study.trim()) return setError('Name the study.');
    if (scope.length === 0) return setError('Choose at least one scope.');
    if (!Number.isInteger(days) || days < 1) return setError('Days must be a whole number, at least 1.');
    onGrant({
      op: 'grant',
      grantee: grantee.trim(),
      purpose: purpose === 'research' ? `research:${study.trim()}` : purpose,
      scope,
      days,
    });
  }

  return (
    <form className="grant-form" onSubmit={submit} aria-labelledby="grant-title">
      <h3 id="grant-title">Grant access</h3>
      <div className="form-row">
        <label htmlFor="grant-grantee">Grantee</label>
        <input id="grant-grantee" value={grantee} onChange={(e) => setGrantee(e.target.value)} />
      </div>
      <div className="form-row">
        <label htmlFor="grant-purpose">Purpose</label>
        <select id="grant-purpose" value={purpose} onChange={(e) => setPurpose(e.target.value as typeof purpose)}>
          <option value="treatment">treatment</option>
          <option value="emergency">emergency</option>
          <option value="research">research</option>
        </select>
      </div>
      {purpose === 'research' && (
        <div className="form-row">
          <label htmlFor="grant-study">Study</label>
          <input id="grant-study" value={study} onChange={(e) => setStudy(e.target.value)} />
        </div>
      )}
      <fieldset className="form-row">
        <legend>Scope</legend>
        {SCOPES.map((s) => (
          <label key={s} className="check">
            <input
              type="checkbox"
              checked={scope.includes(s)}
              onChange={(e) => setScope((cur) => (e.target.checked ? [...cur, s] : cur.filter((x) => x !== s)))}
            />
            {s}
          </label>
        ))}
      </fieldset>
      <div className="form-row">
        <label htmlFor="grant-days">Days</label>
        <input
          id="grant-days"
          type="number"
          min={1}
          max={3650}
          value={days}
          onChange={(e) => setDays(Number(e.target.value))}
        />
      </div>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      <button type="submit" className="primary" disabled={busy}>
        Sign and grant
      </button>
    </form>
  );
}

function AccessLog() {
  const [rows, setRows] = useState<AccessRow[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const load = useCallback(() => {
    api.access().then(
      (r) => {
        setRows(r);
        setError(null);
      },
      (e: unknown) => setError(errText(e)),
    );
  }, []);
  useEffect(load, [load]);

  return (
    <section aria-labelledby="me-access">
      <div className="page-head">
        <h2 id="me-access">Who accessed my data</h2>
        <button type="button" onClick={load}>
          Refresh
        </button>
      </div>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      {rows && rows.length === 0 && <p className="muted">No access recorded.</p>}
      {rows && rows.length > 0 && (
        <Table columns={['Time', 'Actor', 'Action', 'Purpose', 'Detail', 'Proof']}>
          {rows.map((r, i) => (
            <tr key={i} data-testid="access-row">
              <td>{dateTime(r.at)}</td>
              <td>{r.actor}</td>
              <td>{r.action}</td>
              <td>{r.purpose}</td>
              <td className="small">{r.detail}</td>
              <td>
                <span className={`badge proof proof-${r.proof.replace(/[^a-z0-9-]/gi, '')}`}>{r.proof}</span>
              </td>
            </tr>
          ))}
        </Table>
      )}
    </section>
  );
}
