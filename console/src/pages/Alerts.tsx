// Open alerts, sortable by priority and age, with acknowledge and silence.
import { useMemo, useState } from 'react';
import { api } from '../api';
import { alertValues, PriorityBadge, StateLabel } from '../components/Badges';
import { SortHeader, type Sort } from '../components/SortHeader';
import { age, clock, nsToMs, useNow } from '../format';
import { patientHref } from '../router';
import { useAuth } from '../auth';
import { useLive, useStore } from '../stream';
import { PRIORITY_RANK, type Alert } from '../types';

type Key = 'priority' | 'age';

function compare(a: Alert, b: Alert, key: Key): number {
  // Ascending age = newest first; ties fall back to the other key.
  const byAge = b.raised_ns - a.raised_ns;
  const byPrio = PRIORITY_RANK[a.priority] - PRIORITY_RANK[b.priority];
  return key === 'priority' ? byPrio || -byAge : byAge || byPrio;
}

export function AlertsPage() {
  const { alerts } = useLive();
  const { me } = useAuth();
  const canAct = me.role === 'clinician' || me.role === 'admin';
  const now = useNow(1000);
  const [sort, setSort] = useState<Sort<Key>>({ key: 'priority', dir: 'descending' });

  const rows = useMemo(() => {
    const list = [...alerts.values()];
    const sign = sort.dir === 'ascending' ? 1 : -1;
    return list.sort((a, b) => sign * compare(a, b, sort.key) || a.id.localeCompare(b.id));
  }, [alerts, sort]);

  return (
    <section aria-labelledby="alerts-title">
      <h1 id="alerts-title">Open alerts</h1>
      {rows.length === 0 ? (
        <p className="muted">No open alerts.</p>
      ) : (
        <div className="table-wrap">
          <table className="alerts">
            <thead>
              <tr>
                <SortHeader label="Priority" column="priority" sort={sort} onSort={setSort} first="descending" />
                <th scope="col">State</th>
                <th scope="col">Patient</th>
                <th scope="col">Bed</th>
                <th scope="col">Unit</th>
                <th scope="col">Rule</th>
                <th scope="col">Values</th>
                <SortHeader label="Age" column="age" sort={sort} onSort={setSort} first="descending" />
                {canAct && <th scope="col">Actions</th>}
              </tr>
            </thead>
            <tbody>
              {rows.map((a) => (
                <AlertRow key={a.id} a={a} now={now} canAct={canAct} />
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}

function AlertRow({ a, now, canAct }: { a: Alert; now: number; canAct: boolean }) {
  const store = useStore();
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);

  async function act(kind: 'ack' | 'silence') {
    setBusy(true);
    setError(null);
    try {
      const next = kind === 'ack' ? await api.ack(a.id) : await api.silence(a.id, 120);
      if (next && typeof next === 'object' && 'seq' in next) store.applyAlert(next);
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
    } finally {
      setBusy(false);
    }
  }

  const raised = nsToMs(a.raised_ns);
  const silencedUntil = a.state === 'silenced' && a.silenced_until_ns ? nsToMs(a.silenced_until_ns) : null;
  return (
    <tr
      data-testid={`alert-${a.id}`}
      data-state={a.state}
      data-priority={a.priority}
      data-patient={a.patient ?? ''}
      data-rule={a.rule}
      className={`row-prio-${a.priority}`}
    >
      <td>
        <PriorityBadge p={a.priority} />
        {a.technical && <span className="muted small"> technical</span>}
      </td>
      <td>
        <StateLabel a={a} />
        {silencedUntil && <div className="small muted">until {clock(silencedUntil)}</div>}
        {a.by && <div className="small muted">by {a.by}</div>}
      </td>
      <td>{a.patient ? <a href={patientHref(a.patient)}>{a.patient}</a> : a.device ?? a.subject}</td>
      <td>{a.bed ?? '–'}</td>
      <td>{a.unit ?? '–'}</td>
      <td>
        <strong>{a.rule}</strong>
        <div className="small">{a.description}</div>
      </td>
      <td className="small">{alertValues(a) || '–'}</td>
      <td>
        <span title={`raised ${clock(raised)}`}>{age(raised, now)}</span>
        <div className="small muted">{clock(raised)}</div>
      </td>
      {canAct && (
        <td>
          <div className="actions">
            <button
              type="button"
              data-testid={`ack-${a.id}`}
              disabled={busy || a.state === 'acknowledged'}
              onClick={() => act('ack')}
            >
              Acknowledge
            </button>
            <button type="button" data-testid={`silence-${a.id}`} disabled={busy} onClick={() => act('silence')}>
              Silence 2 min
            </button>
          </div>
          {error && (
            <p className="error small" role="alert">
              {error}
            </p>
          )}
        </td>
      )}
    </tr>
  );
}
