// A gateway drains under SDK clients (issue 13): the unmodified @foony/realtime 0.16.0.
// Usage: node drain.mjs; env RT_PROXY (ws:// of a readiness-aware proxy in front of the
// gateways), RT_OBSERVER (ws:// of the gateway that stays), RT_KEY, RT_CLIENTS (how many
// clients behind the proxy, alternately WebSocket and long-polling).
//
// Talks with the test on stdin/stdout: prints "READY" once every client is connected,
// subscribed, present and publishing; the test then SIGTERMs the gateway behind the proxy
// and, once it exited, writes "DRAINED". The clients keep publishing meanwhile; afterwards
// they publish a little more, wait for every acked message to arrive everywhere, and the
// script prints one JSON object (what everyone saw) on its last line. pytest asserts.
import readline from 'node:readline';
import { Realtime } from '@foony/realtime';
import WebSocket from 'ws';
import { deadline, until } from './helpers.mjs';

const PROXY = process.env.RT_PROXY;
const OBSERVER = process.env.RT_OBSERVER;
const KEY = process.env.RT_KEY;
const CLIENTS = Number(process.env.RT_CLIENTS ?? 6);
const run = Math.random().toString(36).slice(2, 10);
const channelName = `drain:${run}`;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const lines = readline.createInterface({ input: process.stdin });
const commands = [];
lines.on('line', (line) => commands.push(line.trim()));

/** Everything one SDK client did and saw. */
function participant(name, endpoint, transport) {
  // Default reconnect back-off (1 s, doubling): what real clients do.
  const realtime = new Realtime({ endpoint, webSocket: WebSocket, transport, key: KEY, clientId: name });
  const state = {
    name, transport, realtime,
    channel: realtime.channels.get(channelName),
    received: [], // [from, k] of every message delivered to the app
    serials: [], // the serial of every message record the channel got (live, replay, fetch)
    presence: [], // [ms, action, clientId] of every presence event
    states: [], // [ms, state]
    sent: 0,
    acked: [], // k of every publish whose promise resolved
    failed: [], // [k, error] of every publish whose promise rejected
  };
  realtime.connection.on((connectionState) => state.states.push([Date.now(), connectionState]));
  state.channel.subscribe((message) => {
    state.received.push([message.data?.from ?? null, message.data?.k ?? null]);
  });
  // The SDK sends every publish as a batch (it auto-batches), and batch members carry no
  // serial of their own: record the serial of each record the channel is handed instead.
  const deliver = state.channel['deliverMessage'].bind(state.channel);
  state.channel['deliverMessage'] = (frame) => {
    if (frame.seq) state.serials.push(frame.seq);
    return deliver(frame);
  };
  state.channel.presence.subscribe((event) => state.presence.push([Date.now(), event.action, event.clientId]));
  return state;
}

let publishing = true;

/** Publish one message at a time, as an app sending chat lines does, until told to stop. */
async function publishLoop(client) {
  while (publishing) {
    const k = client.sent++;
    try {
      await client.channel.publish('n', { from: client.name, k });
      client.acked.push(k);
    } catch (error) {
      client.failed.push([k, String(error.message ?? error)]);
    }
    await sleep(30);
  }
}

function nextCommand(expected, ms) {
  return Promise.race([
    until(() => commands.includes(expected), expected, ms),
    deadline(ms + 100, expected),
  ]);
}

const observer = participant('drain-observer', OBSERVER, 'websocket');
await observer.channel.attach();
await until(() => observer.realtime.getState() === 'connected', 'observer connected');
const clients = [];
for (let index = 0; index < CLIENTS; index++) {
  const transport = index % 2 === 0 ? 'websocket' : 'long-polling';
  clients.push(participant(`drain-client-${index}`, PROXY, transport));
}
await Promise.all(clients.map((client) => client.channel.attach()));
await Promise.all(clients.map((client, index) => client.channel.presence.enter({ n: index })));
await until(
  () => new Set(observer.presence.filter((e) => e[1] === 'enter').map((e) => e[2])).size === CLIENTS,
  'every enter seen by the observer',
);
const connectionIds = clients.map((client) => client.realtime.getConnectionId());
const loops = clients.map((client) => publishLoop(client));
await until(() => clients.every((client) => client.acked.length >= 3), 'publishing');
const presenceBefore = observer.presence.length;
const sigterm = Date.now();
console.log('READY');

await nextCommand('DRAINED', 30000);
const drained = Date.now();
// Every client is back (on the other gateway: the drained one is gone) and publishing.
await until(() => clients.every((client) => client.realtime.getState() === 'connected'), 'all reconnected', 20000);
const counts = clients.map((client) => client.acked.length);
await until(
  () => clients.every((client, index) => client.acked.length >= counts[index] + 3),
  'publishing after the move',
  20000,
);
publishing = false;
await Promise.all(loops);

const expected = clients.flatMap((client) => client.acked.map((k) => `${client.name}/${k}`));
const everyone = [observer, ...clients];
const got = (participant_) => new Set(participant_.received.map(([from, k]) => `${from}/${k}`));
await until(
  () => everyone.every((p) => expected.every((id) => got(p).has(id))),
  'every acked message everywhere',
  20000,
).catch(() => {}); // pytest reports what is missing
// A late leave (grace expiry) or a duplicate would show by now.
await sleep(1000);
const presenceAfter = observer.presence.slice(presenceBefore);

const result = {
  sigterm,
  drained,
  expected,
  presenceAfter,
  observer: { received: observer.received, serials: observer.serials, states: observer.states },
  clients: clients.map((client, index) => ({
    name: client.name,
    transport: client.transport,
    sameConnectionId: client.realtime.getConnectionId() === connectionIds[index],
    state: client.realtime.getState(),
    states: client.states,
    received: client.received,
    serials: client.serials,
    acked: client.acked.length,
    sent: client.sent,
    failed: client.failed,
  })),
};
await Promise.all(everyone.map((p) => p.realtime.close()));
// Exit only once the (large) line is flushed: stdout to a pipe is asynchronous.
process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(0));
