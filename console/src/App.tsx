// Sign-in check, the live connection, navigation and the page switch.
import { useCallback, useEffect, useMemo, useRef, useState } from 'react';
import { api, ApiError, onUnauthorized } from './api';
import type { SecretKey } from './crypto';
import { Header } from './components/Header';
import { AlarmCues } from './components/AlarmCues';
import { AlertsPage } from './pages/Alerts';
import { DevicesPage } from './pages/Devices';
import { LoginPage } from './pages/Login';
import { MePage } from './pages/Me';
import { OverviewPage } from './pages/Overview';
import { PatientPage } from './pages/Patient';
import { navigate, useRoute } from './router';
import { AuthContext, type Auth } from './auth';
import { LiveContext, LiveStore } from './stream';
import type { Me } from './types';

export function App() {
  // undefined: still asking the engine; null: signed out.
  const [me, setMe] = useState<Me | null | undefined>(undefined);
  const [bootError, setBootError] = useState<string | null>(null);
  const keyRef = useRef<SecretKey | null>(null);

  const checkSignIn = useCallback(() => {
    setBootError(null);
    api.me().then(
      (m) => setMe(m),
      (e: unknown) => {
        if (e instanceof ApiError && e.status === 401) setMe(null);
        else setBootError(e instanceof Error ? e.message : String(e));
      },
    );
  }, []);

  useEffect(checkSignIn, [checkSignIn]);

  const onSignedIn = useCallback((m: Me, key: SecretKey | null) => {
    keyRef.current = key;
    setMe(m);
    if (m.role === 'patient') navigate('#/me');
  }, []);

  const onSignedOut = useCallback(() => {
    keyRef.current = null;
    setMe(null);
  }, []);

  if (me === undefined) {
    return (
      <main className="boot" id="main">
        {bootError ? (
          <div role="alert" className="error-box">
            <p>{bootError}</p>
            <button type="button" onClick={checkSignIn}>Try again</button>
          </div>
        ) : (
          <p>Connecting…</p>
        )}
      </main>
    );
  }
  if (me === null) return <LoginPage onSignedIn={onSignedIn} />;
  return <SignedIn key={`${me.role}:${me.id}`} me={me} keyRef={keyRef} onSignedOut={onSignedOut} />;
}

function SignedIn({
  me,
  keyRef,
  onSignedOut,
}: {
  me: Me;
  keyRef: React.RefObject<SecretKey | null>;
  onSignedOut: () => void;
}) {
  const route = useRoute();
  const [store] = useState(
    () =>
      new LiveStore('/v1/console/stream', () => {
        // The browser stopped retrying: signed out, or the engine answered with an error.
        api.me().then(
          () => store.reconnectSoon(),
          (e: unknown) => {
            if (e instanceof ApiError && e.status === 401) onSignedOut();
            else store.reconnectSoon();
          },
        );
      }),
  );

  useEffect(() => {
    store.connect();
    onUnauthorized(onSignedOut);
    return () => {
      onUnauthorized(null);
      store.close();
    };
  }, [store, onSignedOut]);

  const auth: Auth = useMemo(
    () => ({
      me,
      getKey: () => keyRef.current,
      setKey: (k) => {
        keyRef.current = k;
      },
    }),
    [me, keyRef],
  );

  const logout = useCallback(() => {
    store.close();
    api.logout().finally(onSignedOut);
  }, [store, onSignedOut]);

  // The overview stays mounted (hidden) while another page shows: coming
  // back to it then costs no re-creation of every bed's tile.
  let page: React.ReactNode = null;
  switch (route.page) {
    case 'overview':
      break;
    case 'alerts':
      page = <AlertsPage />;
      break;
    case 'patient':
      page = <PatientPage key={route.id} patient={route.id} />;
      break;
    case 'devices':
      page = <DevicesPage />;
      break;
    case 'me':
      page = <MePage />;
      break;
    default:
      page = (
        <section>
          <h1>Not found</h1>
          <p>
            <a href="#/">Back to the overview</a>
          </p>
        </section>
      );
  }

  return (
    <AuthContext.Provider value={auth}>
      <LiveContext.Provider value={store}>
        <a className="skip" href="#main" onClick={(e) => { e.preventDefault(); document.getElementById('main')?.focus(); }}>
          Skip to content
        </a>
        <AlarmCues>
          {(sound) => <Header route={route} onLogout={logout} sound={sound} />}
        </AlarmCues>
        <main id="main" tabIndex={-1}>
          <div hidden={route.page !== 'overview'}>
            <OverviewPage />
          </div>
          {page}
        </main>
      </LiveContext.Provider>
    </AuthContext.Provider>
  );
}
