// The signed-in user and the patient's key, held in page memory only (never in storage).
import { createContext, useContext } from 'react';
import type { SecretKey } from './crypto';
import type { Me } from './types';

export type Auth = {
  me: Me;
  /** The patient's expanded sr25519 key, if they signed in with it during this page's life. */
  getKey: () => SecretKey | null;
  setKey: (k: SecretKey | null) => void;
};

export const AuthContext = createContext<Auth | null>(null);

export function useAuth(): Auth {
  const s = useContext(AuthContext);
  if (!s) throw new Error('Auth missing');
  return s;
}
