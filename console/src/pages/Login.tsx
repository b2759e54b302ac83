// Sign-in: clinicians and administrators with id + secret; patients with their key (the
// browser signs a one-time challenge) or a short-lived token.
import { useState } from 'react';
import { api, ApiError } from '../api';
import { parseKey, signText, type SecretKey } from '../crypto';
import type { Me, Role } from '../types';

type Props = { onSignedIn: (me: Me, key: SecretKey | null) => void };

export function LoginPage({ onSignedIn }: Props) {
  const [role, setRole] = useState<Role>('clinician');
  const [id, setId] = useState('');
  const [secret, setSecret] = useState('');
  const [patient, setPatient] = useState('');
  const [keyText, setKeyText] = useState('');
  const [token, setToken] = useState('');
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  async function submit(e: React.FormEvent) {
    e.preventDefault();
    setError(null);
    setBusy(true);
    try {
      if (role === 'patient') {
        const p = patient.trim();
        if (!p) throw new Error('Enter your patient id.');
        if (keyText.trim()) {
          const key = parseKey(keyText);
          const { challenge } = await api.challenge(p);
          const signature = signText(key, challenge);
          const me = await api.login({ role: 'patient', patient: p, challenge, signature });
          setKeyText('');
          onSignedIn(me, key);
        } else if (token.trim()) {
          const me = await api.login({ role: 'patient', patient: p, token: token.trim() });
          onSignedIn(me, null);
        } else {
          throw new Error('Paste your key, or enter a token.');
        }
      } else {
        const me = await api.login({ role, id: id.trim(), secret });
        setSecret('');
        onSignedIn(me, null);
      }
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) setError(`Sign-in refused: ${err.message}`);
      else setError(err instanceof Error ? err.message : String(err));
    } finally {
      setBusy(false);
    }
  }

  return (
    <main className="login" id="main">
      <form onSubmit={submit} className="login-card" aria-describedby={error ? 'login-error' : undefined}>
        <h1>Wardflow</h1>
        <p className="muted">Central station console</p>
        <label htmlFor="login-role">Sign in as</label>
        <select
          id="login-role"
          data-testid="login-role"
          value={role}
          onChange={(e) => {
            setRole(e.target.value as Role);
            setError(null);
          }}
        >
          <option value="clinician">clinician</option>
          <option value="admin">admin</option>
          <option value="patient">patient</option>
        </select>

        {role !== 'patient' ? (
          <>
            <label htmlFor="login-id">{role === 'admin' ? 'Administrator id' : 'Clinician id'}</label>
            <input
              id="login-id"
              data-testid="login-id"
              autoComplete="username"
              value={id}
              onChange={(e) => setId(e.target.value)}
              required
            />
            <label htmlFor="login-secret">Secret</label>
            <input
              id="login-secret"
              data-testid="login-secret"
              type="password"
              autoComplete="current-password"
              value={secret}
              onChange={(e) => setSecret(e.target.value)}
              required
            />
          </>
        ) : (
          <>
            <label htmlFor="login-patient">Patient id</label>
            <input
              id="login-patient"
              data-testid="login-patient"
              autoComplete="username"
              value={patient}
              onChange={(e) => setPatient(e.target.value)}
              required
            />
            <label htmlFor="login-key">Your key</label>
            <textarea
              id="login-key"
              data-testid="login-key"
              rows={2}
              spellCheck={false}
              autoComplete="off"
              placeholder="0x… (the secret URI from your key file)"
              aria-describedby="login-key-help"
              value={keyText}
              onChange={(e) => setKeyText(e.target.value)}
            />
            <p id="login-key-help" className="help">
              Your key stays in this page: it signs a one-time challenge and is never sent.
            </p>
            <label htmlFor="login-token">Or a token</label>
            <input
              id="login-token"
              data-testid="login-token"
              autoComplete="off"
              spellCheck={false}
              aria-describedby="login-token-help"
              value={token}
              onChange={(e) => setToken(e.target.value)}
            />
            <p id="login-token-help" className="help">
              From <code>wardflow patients token</code>; good for five minutes.
            </p>
          </>
        )}
        <button type="submit" data-testid="login-submit" className="primary" disabled={busy}>
          {busy ? 'Signing in…' : 'Sign in'}
        </button>
        <p id="login-error" data-testid="login-error" className="error" role="alert" hidden={!error}>
          {error}
        </p>
      </form>
    </main>
  );
}
