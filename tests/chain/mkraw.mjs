// Turns a plain chain spec (runtime code plus a genesis preset) into a raw one, through the
// runtime's own GenesisBuilder API executed by chopsticks. Usage: node mkraw.mjs PLAIN RAW [PRESET]
import { runTask, destroyWorker } from '@acala-network/chopsticks-core';
import { compactToU8a, u8aConcat, stringToU8a, u8aToHex, hexToU8a, compactFromU8a } from '@polkadot/util';
import fs from 'fs';
const [,, input, output, preset = 'development'] = process.argv;
const spec = JSON.parse(fs.readFileSync(input));
const code = spec.genesis.runtimeGenesis.code;
const handler = { getStorage: async()=>undefined, getNextKey: async()=>undefined, offchainGetStorage: async()=>undefined, offchainTimestamp: async()=>Date.now(), offchainRandomSeed: async()=>'0x'+'00'.repeat(32), offchainSubmitTransaction: async()=>false };
const call = async (method, arg) => {
  const r = await runTask({ wasm: code, calls: [[method, [arg]]], mockSignatureHost: false, allowUnresolvedImports: false, runtimeLogLevel: 0 }, handler);
  if (r.Error) throw new Error(r.Error);
  return r.Call;
};
const vecU8 = (u8) => u8aConcat(compactToU8a(u8.length), u8);
const id = stringToU8a(preset);
const res = hexToU8a((await call('GenesisBuilder_get_preset', u8aToHex(u8aConcat([1], vecU8(id))))).result);
if (res[0] !== 1) throw new Error('preset not found');
const [off, len] = compactFromU8a(res.subarray(1));
const bigParse = (s) => JSON.parse(s.replace(/([:\[,]\s*)(-?\d{16,})(?=\s*[,\]}])/g, '$1"__BIG__$2"'));
const bigStringify = (o) => JSON.stringify(o).replace(/"__BIG__(-?\d+)"/g, '$1');
const decodeVec = (u8) => { const [o, l] = compactFromU8a(u8); return Buffer.from(u8.subarray(o, o + l.toNumber())).toString(); };
const presetJson = bigParse(decodeVec(res.subarray(1)));
const defRes = hexToU8a((await call('GenesisBuilder_get_preset', '0x00')).result);
const def = bigParse(decodeVec(defRes.subarray(1)));
const merge = (a, b) => { for (const [k, v] of Object.entries(b)) { if (v && typeof v === 'object' && !Array.isArray(v) && a[k] && typeof a[k] === 'object' && !Array.isArray(a[k])) merge(a[k], v); else a[k] = v; } return a; };
const json = merge(def, presetJson);
console.error('preset', preset, Object.keys(json).join(','));
console.error(bigStringify(json.balances).slice(0, 300), 'sudo', JSON.stringify(json.sudo));
const out = await call('GenesisBuilder_build_state', u8aToHex(vecU8(stringToU8a(bigStringify(json)))));
if (out.result !== '0x00') throw new Error('build_state failed ' + Buffer.from(out.result.slice(4), 'hex').toString());
const top = {};
for (const [k, v] of out.storageDiff) if (v !== null) top[k] = v;
top['0x3a636f6465'] = code;
const raw = { name: spec.name, id: spec.id, chainType: 'Development', bootNodes: [], telemetryEndpoints: null, protocolId: null,
  properties: spec.properties ?? { tokenSymbol: 'UNIT', tokenDecimals: 12, ss58Format: 42 },
  relay_chain: spec.relay_chain, para_id: json.parachainInfo?.parachainId ?? 1000,
  codeSubstitutes: {}, genesis: { raw: { top, childrenDefault: {} } } };
fs.writeFileSync(output, JSON.stringify(raw, null, 1));
console.error('keys', Object.keys(top).length);
await destroyWorker();
