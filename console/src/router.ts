// A tiny hash router: #/, #/alerts, #/patient/<id>, #/devices, #/me.
import { useEffect, useState } from 'react';

export type Route =
  | { page: 'overview' }
  | { page: 'alerts' }
  | { page: 'patient'; id: string }
  | { page: 'devices' }
  | { page: 'me' }
  | { page: 'unknown'; hash: string };

export function parseHash(hash: string): Route {
  const path = hash.replace(/^#/, '') || '/';
  if (path === '/' || path === '') return { page: 'overview' };
  if (path === '/alerts') return { page: 'alerts' };
  if (path === '/devices') return { page: 'devices' };
  if (path === '/me') return { page: 'me' };
  const m = /^\/patient\/(.+)$/.exec(path);
  if (m) return { page: 'patient', id: decodeURIComponent(m[1]) };
  return { page: 'unknown', hash };
}

export const patientHref = (id: string) => `#/patient/${encodeURIComponent(id)}`;

export function navigate(hash: string) {
  window.location.hash = hash;
}

export function useRoute(): Route {
  const [route, setRoute] = useState(() => parseHash(window.location.hash));
  useEffect(() => {
    const on = () => setRoute(parseHash(window.location.hash));
    window.addEventListener('hashchange', on);
    return () => window.removeEventListener('hashchange', on);
  }, []);
  return route;
}
