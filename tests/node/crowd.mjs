// A crowd of SDK clients for the gateway-kill fault (issue 14): RT_COUNT Realtime clients on
// RT_URL follow channel RT_CHANNEL. Prints "ready" once every one is attached; on "stop" (a
// line on stdin) prints, as JSON on its last line, the serials each client received and the
// states it went through. The SDK reconnects and resumes by serial by itself.
import readline from 'node:readline';
import { Realtime } from '@foony/realtime';
import WebSocket from 'ws';
import { deadline } from './helpers.mjs';

const count = Number(process.env.RT_COUNT ?? '50');
const clients = [];
for (let index = 0; index < count; index += 1) {
  const realtime = new Realtime({
    endpoint: process.env.RT_URL,
    webSocket: WebSocket,
    key: process.env.RT_KEY,
    clientId: `sdk-crowd-${index}`,
    initialReconnectDelayMs: 100,
    maxReconnectDelayMs: 1000,
  });
  const record = { serials: [], states: [] };
  const channel = realtime.channels.get(process.env.RT_CHANNEL);
  channel.on((change) => record.states.push({ current: change.current, resumed: change.resumed }));
  channel.subscribe((message) => record.serials.push(message.seq ?? 0));
  clients.push({ realtime, channel, record });
}
await Promise.race([
  Promise.all(clients.map(({ channel }) => channel.attach())),
  deadline(30000, 'attaching the crowd'),
]);
console.log('ready');
const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  if (line.trim() === 'stop') break;
}
const result = clients.map(({ realtime, record }) => ({ ...record, state: realtime.getState() }));
await Promise.all(clients.map(({ realtime }) => realtime.close()));
// Exit only once the (large) line is written: a pipe takes 64 KiB at a time.
process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(0));
