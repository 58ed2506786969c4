// Key-registry scenarios with the unmodified @foony/realtime 0.16.0 SDK (issue 12).
// Usage: node keys.mjs <scenario>; env RT_A / RT_B (ws:// endpoints of two gateways),
// RT_KEY (a registry key), RT_TRANSPORT (websocket or long-polling), and for 'revocation'
// RT_REVOKE_COMMAND (a JSON array: the `realtime keys revoke` command line to run).
// Prints one JSON object on the last line; pytest makes the assertions.
import { execFileSync } from 'node:child_process';
import { Realtime } from '@foony/realtime';
import WebSocket from 'ws';
import { deadline, errorOf, until } from './helpers.mjs';

const A = process.env.RT_A;
const B = process.env.RT_B;
const KEY = process.env.RT_KEY;
const TRANSPORT = process.env.RT_TRANSPORT ?? 'websocket';
const run = Math.random().toString(36).slice(2, 10);

function client(endpoint, options = {}) {
  return new Realtime({ endpoint, key: KEY, webSocket: WebSocket, transport: TRANSPORT, ...options });
}

const scenarios = {
  /** A key's capability, as SDK errors: 40302 for a channel, 40301 for an operation. */
  async capabilities() {
    const realtime = client(A, { clientId: 'scoped' });
    await realtime.connect();
    const open = realtime.channels.get(`public:${run}`);
    const received = [];
    open.subscribe((message) => received.push(message.data));
    await open.attach();
    await open.publish('n', { ok: true });
    await until(() => received.length === 1, 'own message');
    const result = {
      received,
      attachDenied: await errorOf(realtime.channels.get(`private:${run}`).attach()),
      historyDenied: await errorOf(open.history()),
      presenceDenied: await errorOf(open.presence.enter({ here: true })),
      state: realtime.getState(),
    };
    await realtime.close();
    return result;
  },

  /** Revoking the key ends the SDK clients on both gateways: err 40101, then 'failed'. */
  async revocation() {
    const clients = { a: client(A, { clientId: 'on-a' }), b: client(B, { clientId: 'on-b' }) };
    const events = { a: [], b: [] };
    for (const [name, realtime] of Object.entries(clients)) {
      realtime.connection.on((state, reason) => events[name].push([state, reason ? String(reason.message ?? reason) : null]));
      await realtime.connect();
      await realtime.channels.get(`revoked:${run}`).attach();
    }
    const started = Date.now();
    const [command, ...args] = JSON.parse(process.env.RT_REVOKE_COMMAND);
    execFileSync(command, args, { stdio: ['ignore', 'ignore', 'inherit'] });
    await until(() => Object.values(clients).every((realtime) => realtime.getState() === 'failed'), 'both failed', 15000);
    const elapsedMs = Date.now() - started;
    const seen = JSON.parse(JSON.stringify(events)); // before close() adds its own states
    const after = await errorOf(client(A, { autoReconnect: false }).connect());
    for (const realtime of Object.values(clients)) await realtime.close();
    return { events: seen, elapsedMs, after };
  },
};

const scenario = scenarios[process.argv[2]];
if (!scenario) {
  console.error(`unknown scenario ${process.argv[2]}`);
  process.exit(2);
}
console.log(JSON.stringify(await scenario()));
process.exit(0);
