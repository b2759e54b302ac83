// Devices: the latest `devices` stream event (fetched once at first, until the stream sends one).
import { useEffect, useMemo, useState } from 'react';
import { api } from '../api';
import { SortHeader, type Sort } from '../components/SortHeader';
import { age, clock, useNow } from '../format';
import { patientHref } from '../router';
import { useLive } from '../stream';
import type { Device, DeviceStatus } from '../types';

type Key = 'device' | 'status';

// Problems first when sorted by status.
const STATUS_ORDER: Record<DeviceStatus, number> = { offline: 0, 'never-seen': 1, unbound: 2, online: 3 };
const natural = (a: string, b: string) => a.localeCompare(b, undefined, { numeric: true });

export function DevicesPage() {
  const live = useLive().devices;
  const [fetched, setFetched] = useState<Device[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [sort, setSort] = useState<Sort<Key>>({ key: 'device', dir: 'ascending' });
  const now = useNow(1000);

  useEffect(() => {
    let alive = true;
    api.devices().then(
      (d) => alive && setFetched(d),
      (e: unknown) => alive && setError(e instanceof Error ? e.message : String(e)),
    );
    return () => {
      alive = false;
    };
  }, []);

  const devices = live ?? fetched;
  const rows = useMemo(() => {
    const list = [...(devices ?? [])];
    const sign = sort.dir === 'ascending' ? 1 : -1;
    return list.sort((a, b) => {
      const c =
        sort.key === 'device'
          ? natural(a.device, b.device)
          : STATUS_ORDER[a.status] - STATUS_ORDER[b.status] || natural(a.device, b.device);
      return sign * c;
    });
  }, [devices, sort]);

  return (
    <section aria-labelledby="devices-title">
      <h1 id="devices-title">Devices</h1>
      {error && !devices && (
        <p className="error-box" role="alert">
          {error}
        </p>
      )}
      {devices && devices.length === 0 && <p className="muted">No devices.</p>}
      {rows.length > 0 && (
        <div className="table-wrap">
          <table>
            <thead>
              <tr>
                <SortHeader label="Device" column="device" sort={sort} onSort={setSort} />
                <th scope="col">Patient</th>
                <th scope="col">Unit</th>
                <th scope="col">Bed</th>
                <SortHeader label="Status" column="status" sort={sort} onSort={setSort} />
                <th scope="col">Last seen</th>
                <th scope="col" className="num">Rate /min</th>
                <th scope="col" className="num">Gaps</th>
                <th scope="col" className="num">Dead letters</th>
                <th scope="col">Last dead-letter reason</th>
              </tr>
            </thead>
            <tbody>
              {rows.map((d) => (
                <tr key={d.device} data-testid={`device-${d.device}`} data-status={d.status}>
                  <th scope="row">{d.device}</th>
                  <td>{d.patient ? <a href={patientHref(d.patient)}>{d.patient}</a> : '–'}</td>
                  <td>{d.unit ?? '–'}</td>
                  <td>{d.bed ?? '–'}</td>
                  <td>
                    <span className={`badge status-${d.status}`}>{d.status}</span>
                  </td>
                  <td>
                    {d.last_seen == null ? (
                      'never'
                    ) : (
                      <span title={clock(d.last_seen)}>{age(d.last_seen, now)} ago</span>
                    )}
                  </td>
                  <td className="num">{Number.isInteger(d.rate) ? d.rate : d.rate.toFixed(1)}</td>
                  <td className="num">{d.gaps}</td>
                  <td className="num">{d.dead_letters}</td>
                  <td className="small">{d.last_dead_reason ?? '–'}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}
