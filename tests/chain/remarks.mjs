// Counts, with @polkadot/api (independently of Wardflow's own chain client), the System.Remarked
// events of one account in every finalized block, and how many distinct remarks they are.
// Usage: node remarks.mjs WS_URL ACCOUNT_HEX; prints {"head":N,"remarks":R,"distinct":D}.
import { ApiPromise, WsProvider } from '@polkadot/api';
import { u8aToHex } from '@polkadot/util';
const [,, url, account] = process.argv;
const api = await ApiPromise.create({ provider: new WsProvider(url), noInitWarn: true });
const head = (await api.rpc.chain.getHeader(await api.rpc.chain.getFinalizedHead())).number.toNumber();
const seen = new Map();
let remarks = 0;
for (let n = 1; n <= head; n++) {
  const at = await api.at(await api.rpc.chain.getBlockHash(n));
  for (const { event } of await at.query.system.events()) {
    if (event.section === 'system' && event.method === 'Remarked'
        && u8aToHex(event.data[0]) === `0x${account}`) {
      remarks += 1;
      const hash = event.data[1].toHex();
      seen.set(hash, (seen.get(hash) ?? 0) + 1);
    }
  }
}
console.log(JSON.stringify({ head, remarks, distinct: seen.size }));
await api.disconnect();
