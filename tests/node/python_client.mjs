// The JS SDK's side of the Python client interop test (tests/client/test_sdk_interop.py).
// Usage: node python_client.mjs <channel> <base64 AES key> <resume serial>; env RT_A (ws://
// endpoint), RT_KEY. Talks to the test over lines: prints {"ready":...} once attached and
// present, waits for the line "published", checks it got the Python client's messages and
// presence, publishes its own, prints what it saw, waits for "bye", closes, prints {"closed"}.
import readline from 'node:readline';
import { Realtime } from '@foony/realtime';
import WebSocket from 'ws';
import { until } from './helpers.mjs';

const [name, cipherKey, resumeSerial] = process.argv.slice(2);
const inbox = [];
readline.createInterface({ input: process.stdin }).on('line', (line) => inbox.push(line.trim()));
const say = (value) => console.log(JSON.stringify(value));
const line = (text) => until(() => inbox.includes(text), `the line "${text}"`, 20000);
const view = (message) => ({
  name: message.name, data: message.data ?? null, messageId: message.messageId,
  clientId: message.clientId ?? null, ephemeral: message.ephemeral ?? false,
  encoding: message.encoding ?? null,
});

const client = new Realtime({
  endpoint: process.env.RT_A, key: process.env.RT_KEY, clientId: 'js',
  webSocket: WebSocket, transport: 'websocket',
});
const plain = client.channels.get(name);
const secret = client.channels.get(`${name}:enc`, { cipher: { key: cipherKey } });
const received = [];
const decrypted = [];
const presence = [];
plain.subscribe((message) => received.push(view(message)));
secret.subscribe((message) => decrypted.push(view(message)));
secret.presence.subscribe((event) => presence.push([event.action, event.clientId, event.data ?? null]));
await plain.attach();
await secret.attach();
await secret.presence.enter({ who: 'js' });

// Resume by serial from messages the Python client published before this script started.
const resuming = client.channels.get(`${name}:resume`);
const replayed = [];
let resumed = null;
resuming.on('attached', (change) => { resumed = change.resumed; });
resuming.resumeFrom(Number(resumeSerial));
resuming.subscribe((message) => replayed.push(view(message)));
await resuming.attach();
say({ ready: true, connectionId: client.getConnectionId() });

await line('published');
await until(
  () => received.length >= 4 && decrypted.length >= 1 && presence.some((event) => event[1] === 'py'),
  'the Python client\'s messages and presence',
);
await plain.publish('from-js', { n: 1 });
await plain.publish([{ name: 'a', data: 1 }, { name: 'b', data: 2 }]);
await plain.publish('js-typing', true, { ephemeral: true });
await secret.publish('js-secret', { pin: 42 });
say({ received, decrypted, presence, replayed, resumed });
await line('bye');
await client.close();
say({ closed: true });
process.exit(0);
