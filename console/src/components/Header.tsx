// Top bar: navigation, connection state, sound toggle, the signed-in user and logout.
import type { Route } from '../router';
import { useAuth } from '../auth';
import { useLive } from '../stream';
import type { SoundControl } from './AlarmCues';

type Props = { route: Route; onLogout: () => void; sound: SoundControl };

export function Header({ route, onLogout, sound }: Props) {
  const { me } = useAuth();
  const { connection, alerts } = useLive();
  const clinical = me.role !== 'patient';
  let highOpen = 0;
  for (const a of alerts.values()) if (a.priority === 'high' && a.state !== 'acknowledged') highOpen++;

  const link = (page: Route['page'], href: string, testid: string, label: React.ReactNode) => (
    <li>
      <a href={href} data-testid={testid} aria-current={route.page === page ? 'page' : undefined}>
        {label}
      </a>
    </li>
  );

  return (
    <header className="top">
      <div className="top-row">
        <span className="brand">Wardflow</span>
        <nav aria-label="Main">
          <ul>
            {link('overview', '#/', 'nav-overview', 'Overview')}
            {link(
              'alerts',
              '#/alerts',
              'nav-alerts',
              <>
                Alerts
                {alerts.size > 0 && (
                  <span className={`count${highOpen ? ' count-high' : ''}`}>
                    {alerts.size}
                    <span className="visually-hidden"> open</span>
                  </span>
                )}
              </>,
            )}
            {clinical && link('devices', '#/devices', 'nav-devices', 'Devices')}
            {me.role === 'patient' && link('me', '#/me', 'nav-me', 'My data')}
          </ul>
        </nav>
        <div className="top-tools">
          <button type="button" onClick={sound.toggle} aria-pressed={sound.on} className={sound.on ? 'sound-on' : ''}>
            {sound.on ? 'Sound on' : 'Sound off'}
          </button>
          <span className="who" title={me.units.length ? `Units: ${me.units.join(', ')}` : undefined}>
            {me.role} <strong>{me.id}</strong>
          </span>
          <button type="button" data-testid="logout" onClick={onLogout}>
            Log out
          </button>
        </div>
      </div>
      {connection !== 'open' && (
        <div className={`conn conn-${connection}`} role="status">
          {connection === 'connecting' && 'Connecting to the live feed…'}
          {connection === 'reconnecting' && 'Connection lost: reconnecting… values shown may be out of date.'}
          {connection === 'closed' && 'The live feed stopped; retrying shortly.'}
        </div>
      )}
    </header>
  );
}
