// Patient keys: a secret URI `0x` + 64 hex digits, i.e. a 32-byte sr25519 mini-secret seed
// (Substrate's format). `secretFromSeed` expands it the way schnorrkel's
// `MiniSecretKey::expand(ExpansionMode::Ed25519)` does, and `sign` uses the Merlin signing
// context "substrate", matching Substrate / subxt signers.
import { secretFromSeed, sign } from '@scure/sr25519';

export type SecretKey = Uint8Array; // 64 bytes: scalar || nonce

export function hexToBytes(hex: string): Uint8Array {
  const h = hex.startsWith('0x') || hex.startsWith('0X') ? hex.slice(2) : hex;
  if (h.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(h)) throw new Error('not a hex string');
  const out = new Uint8Array(h.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(h.slice(i * 2, i * 2 + 2), 16);
  return out;
}

export function bytesToHex(bytes: Uint8Array): string {
  let s = '';
  for (const b of bytes) s += b.toString(16).padStart(2, '0');
  return s;
}

/** Parses the pasted secret URI; throws a readable error for anything else. */
export function parseKey(text: string): SecretKey {
  const t = text.trim();
  if (!/^0x[0-9a-fA-F]{64}$/.test(t)) {
    throw new Error('The key must be the secret URI from your key file: 0x followed by 64 hex digits.');
  }
  return secretFromSeed(hexToBytes(t));
}

/** sr25519 signature (context "substrate") as 128 hex digits, no 0x prefix. */
export function signBytes(key: SecretKey, message: Uint8Array): string {
  return bytesToHex(sign(key, message));
}

export function signText(key: SecretKey, text: string): string {
  return signBytes(key, new TextEncoder().encode(text));
}
