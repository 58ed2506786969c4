// SDK interop scenarios: the unmodified @foony/realtime 0.16.0 against our gateways.
// Usage: node interop.mjs <scenario>; env RT_A / RT_B (ws:// endpoints of two gateways),
// RT_KEY (API key), RT_TRANSPORT (websocket or long-polling). Prints one JSON object (the scenario's observations) on the last line;
// pytest makes the assertions.
import http from 'node:http';
import net from 'node:net';
import { Realtime, createJwt, generateRandomKey } from '@foony/realtime';
import WebSocket from 'ws';
import { deadline, errorOf, until } from './helpers.mjs';

const A = process.env.RT_A;
const B = process.env.RT_B;
const KEY = process.env.RT_KEY;
// 'websocket' or 'long-polling': every scenario runs over both transports (issue 11).
const TRANSPORT = process.env.RT_TRANSPORT ?? 'websocket';
const run = Math.random().toString(36).slice(2, 10);

function client(endpoint, options = {}) {
  return new Realtime({
    endpoint,
    webSocket: WebSocket,
    transport: TRANSPORT,
    ...(options.token || options.authCallback ? {} : { key: KEY }),
    ...options,
  });
}

function view(message) {
  return {
    name: message.name, data: message.data, messageId: message.messageId,
    clientId: message.clientId ?? null, seq: message.seq ?? null,
    ephemeral: message.ephemeral ?? false, encoding: message.encoding ?? null,
  };
}

/** A TCP proxy in front of a gateway whose live connections can be cut at will. */
async function tcpProxy(target) {
  const url = new URL(target);
  const sockets = new Set();
  let refusing = false;
  const server = net.createServer((downstream) => {
    if (refusing) {
      downstream.destroy();
      return;
    }
    const upstream = net.connect(Number(url.port), url.hostname);
    for (const socket of [downstream, upstream]) {
      sockets.add(socket);
      socket.on('close', () => sockets.delete(socket));
      socket.on('error', () => {});
    }
    downstream.pipe(upstream);
    upstream.pipe(downstream);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `ws://127.0.0.1:${server.address().port}`,
    cut() {
      for (const socket of sockets) socket.destroy();
    },
    /** While refusing, new connections are dropped at once (the client stays away). */
    refuse(value) {
      refusing = value;
    },
    close() {
      this.cut();
      server.close();
    },
  };
}

/**
 * Publish data first..last on ``name`` as single JSON publishes, pipelined, until acked. At
 * most 500 per connection, one connection after the other (order kept): a connection may
 * publish RT_PUBLISH_BURST (1,000) messages at once, then RT_PUBLISH_RATE (100) per second.
 */
async function publishRaw(endpoint, name, first, last) {
  for (let start = first; start <= last; start += 500) {
    await publishRawOnce(endpoint, name, start, Math.min(last, start + 499));
  }
}

async function publishRawOnce(endpoint, name, first, last) {
  const socket = new WebSocket(endpoint);
  await new Promise((resolve, reject) => {
    socket.once('open', resolve);
    socket.once('error', reject);
  });
  let acked = 0;
  const done = new Promise((resolve, reject) => {
    socket.on('message', (data) => {
      const frame = JSON.parse(String(data));
      if (frame.t === 'err') reject(new Error(JSON.stringify(frame)));
      if (frame.t === 'ack' && ++acked === last - first + 1) resolve();
    });
  });
  socket.send(JSON.stringify({ t: 'auth', key: KEY, clientId: 'raw-publisher' }));
  for (let index = first; index <= last; index++) {
    socket.send(JSON.stringify({ t: 'pub', id: index, channel: name, name: 'n', data: index, messageId: `raw-${run}-${index}` }));
  }
  await done;
  socket.close();
}

/**
 * An HTTP proxy in front of a gateway that refuses every WebSocket upgrade (as some corporate
 * proxies do) and forwards plain HTTP: the SDK's 'auto' transport has to fall back.
 */
async function noUpgradeProxy(target) {
  const url = new URL(target);
  const counts = { upgrades: 0, requests: 0 };
  const server = http.createServer((request, response) => {
    counts.requests += 1;
    const upstream = http.request(
      { host: url.hostname, port: Number(url.port), method: request.method, path: request.url, headers: request.headers },
      (answer) => {
        response.writeHead(answer.statusCode, answer.headers);
        answer.pipe(response);
      },
    );
    upstream.on('error', () => response.destroy());
    request.pipe(upstream);
  });
  server.on('upgrade', (request, socket) => {
    counts.upgrades += 1;
    socket.end('HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n');
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `ws://127.0.0.1:${server.address().port}`,
    counts,
    close() {
      server.closeAllConnections();
      server.close();
    },
  };
}

function presenceView(event) {
  return [event.action, event.clientId, event.data ?? null];
}

const scenarios = {
  async 'auto-fallback'() {
    // 'auto' starts on WebSocket; the proxy refuses the upgrade, so the SDK must fall back to
    // long-polling and then work as usual.
    const proxy = await noUpgradeProxy(A);
    const name = `fallback:${run}`;
    const subscriber = client(proxy.url, { transport: 'auto', clientId: 'behind-proxy' });
    const publisher = client(B, { transport: 'websocket', clientId: 'outside' });
    const received = [];
    const channel = subscriber.channels.get(name);
    channel.subscribe((message) => received.push(view(message)));
    await channel.attach();
    await publisher.channels.get(name).publish('n', { from: 'outside' });
    await channel.publish('n', { from: 'behind-proxy' });
    await until(() => received.length === 2, 'both messages through the fallback');
    const result = { state: subscriber.getState(), received, counts: { ...proxy.counts } };
    await subscriber.close();
    await publisher.close();
    proxy.close();
    return result;
  },

  async 'presence'() {
    const name = `presence:${run}`;
    const watcher = client(B, { clientId: 'sdk-watcher' });
    const member = client(A, { clientId: 'sdk-member' });
    const events = [];
    const watched = watcher.channels.get(name);
    watched.presence.subscribe((event) => events.push(presenceView(event)));
    await until(() => watcher.getState() === 'connected', 'watcher connected');
    await new Promise((resolve) => setTimeout(resolve, 300)); // presSub acked
    const channel = member.channels.get(name);
    const own = [];
    channel.presence.subscribe((event) => own.push(presenceView(event)));
    await channel.attach();
    await channel.presence.enter({ status: 'here' });
    await until(() => events.length >= 1, 'enter');
    await channel.presence.update({ status: 'busy' });
    await until(() => events.length >= 2, 'update');
    await channel.presence.leave();
    await until(() => events.length >= 3, 'leave');
    await channel.presence.enter({ status: 'back' });
    await until(() => events.length >= 4, 're-enter');
    await member.close();
    await until(() => events.length >= 5, 'leave on close');
    await watcher.close();
    return { events, own };
  },

  async 'presence-reconnect'() {
    const proxy = await tcpProxy(A);
    const name = `presence-cut:${run}`;
    const watcher = client(B, { clientId: 'sdk-observer' });
    const member = client(proxy.url, { clientId: 'sdk-flaky', initialReconnectDelayMs: 200 });
    const events = [];
    watcher.channels.get(name).presence.subscribe((event) => events.push(presenceView(event)));
    await until(() => watcher.getState() === 'connected', 'watcher connected');
    await new Promise((resolve) => setTimeout(resolve, 300));
    const channel = member.channels.get(name);
    await channel.attach();
    await channel.presence.enter({ n: 1 });
    await until(() => events.length >= 1, 'enter');
    const states = [];
    member.connection.on((state) => states.push(state));
    proxy.cut();
    await until(() => states.includes('connected'), 'reconnected', 15000);
    await new Promise((resolve) => setTimeout(resolve, Number(process.env.RT_WAIT_MS ?? 3000)));
    const result = { events: [...events], states };
    await member.close();
    await until(() => events.length >= 2, 'leave after close');
    result.after = events;
    await watcher.close();
    proxy.close();
    return result;
  },

  async 'history-paging'() {
    const realtime = client(A);
    await realtime.connect();
    const name = `paging:${run}`;
    // Single (non-batch) publishes, so every history entry carries its own serial, which the
    // SDK pages by (expanded batch members carry none).
    for (let index = 0; index < 25; index++) {
      await realtime.connection['publish']({ t: 'pub', channel: name, name: 'n', data: index });
    }
    const channel = realtime.channels.get(name);
    const pages = [];
    let before;
    for (;;) {
      const page = await channel.history({ limit: 10, ...(before ? { before } : {}) });
      pages.push({ seqs: page.messages.map((m) => m.seq), data: page.messages.map((m) => m.data), more: page.more });
      if (!page.more) break;
      before = page.messages[0].seq;
    }
    await realtime.close();
    return { pages };
  },

  async 'tcp-cut'() {
    const proxy = await tcpProxy(A);
    const states = [];
    const subscriber = client(proxy.url, { clientId: 'sdk-cut', initialReconnectDelayMs: 200 });
    subscriber.connection.on((state) => states.push(state));
    const publisher = client(B, { clientId: 'sdk-cut-pub' });
    const name = `cut:${run}`;
    const received = [];
    const channel = subscriber.channels.get(name);
    channel.subscribe((message) => received.push(message.data));
    await channel.attach();
    const firstConnectionId = subscriber.getConnectionId();
    const out = publisher.channels.get(name);
    for (let index = 0; index < 10; index++) await out.publish('n', index);
    await until(() => received.length === 10, 'first 10');
    proxy.cut();
    await until(() => subscriber.getState() !== 'connected', 'disconnect noticed');
    // Published while the subscriber is away: it must get every one after reconnecting.
    for (let index = 10; index < 30; index++) await out.publish('n', index);
    await until(() => received.length >= 30, `all 30 (got ${received.length})`, 20000);
    await new Promise((resolve) => setTimeout(resolve, 300));
    const result = { received, states, sameConnectionId: subscriber.getConnectionId() === firstConnectionId };
    await subscriber.close();
    await publisher.close();
    proxy.close();
    return result;
  },

  async 'resume-backlog'() {
    // A subscriber away while 1,500 messages are published on a quiet channel must get all
    // of them on resume, in order, with nothing published after it comes back.
    const proxy = await tcpProxy(A);
    const subscriber = client(proxy.url, { clientId: 'sdk-backlog', initialReconnectDelayMs: 100 });
    const publisher = client(B, { clientId: 'sdk-backlog-pub' });
    const name = `backlog:${run}`;
    const received = [];
    const channel = subscriber.channels.get(name);
    channel.subscribe((message) => received.push(message.data));
    await channel.attach();
    const out = publisher.channels.get(name);
    await out.publish('n', 0);
    await until(() => received.length === 1, 'the first message');
    proxy.refuse(true);
    proxy.cut();
    await until(() => subscriber.getState() !== 'connected', 'disconnect noticed');
    const missed = 1500;
    // Each its own serial: the SDK would auto-batch concurrent publishes (one serial per
    // batch) and throttles single ones, so a raw JSON connection pipelines them.
    await publishRaw(B, name, 1, missed);
    proxy.refuse(false);
    await until(() => received.length >= missed + 1, `all ${missed + 1} (got ${received.length})`, 30000);
    await new Promise((resolve) => setTimeout(resolve, 300));
    const result = { received, state: subscriber.getState() };
    await subscriber.close();
    await publisher.close();
    proxy.close();
    return result;
  },

  async 'connect-key'() {
    const states = [];
    const realtime = client(A, { clientId: 'sdk-alice' });
    realtime.connection.on((state) => states.push(state));
    await realtime.connect();
    const result = {
      state: realtime.getState(),
      clientId: realtime.connection.getClientId(),
      connectionId: realtime.getConnectionId(),
    };
    await realtime.close();
    result.states = states;
    result.finalState = realtime.getState();
    return result;
  },

  async 'connect-jwt'() {
    const token = await createJwt(
      { clientId: 'sdk-jwt-user', capability: { '*': ['*'] }, ttlMs: 60000 }, { key: KEY },
    );
    const realtime = client(B, { token });
    await realtime.connect();
    const result = { state: realtime.getState(), clientId: realtime.connection.getClientId() };
    // The token authorises real work, not just the handshake.
    const channel = realtime.channels.get(`jwt:${run}`);
    const received = [];
    channel.subscribe((message) => received.push(view(message)));
    await channel.attach();
    await channel.publish('hello', { via: 'jwt' });
    await until(() => received.length === 1, 'own message');
    result.received = received;
    await realtime.close();
    return result;
  },

  async 'bad-credentials'() {
    const states = [];
    const realtime = client(A, { key: KEY.split(':')[0] + ':wrong', autoReconnect: false });
    realtime.connection.on((state, reason) => states.push([state, reason ? String(reason.message ?? reason) : null]));
    const error = await errorOf(realtime.connect());
    await until(() => realtime.getState() === 'failed', 'failed state', 5000).catch(() => {});
    return { error, state: realtime.getState(), states };
  },

  async 'pubsub'() {
    const subscriber = client(A, { clientId: 'sdk-sub' });
    const publisher = client(B, { clientId: 'sdk-pub' });
    const name = `pubsub:${run}`;
    const received = [];
    const channel = subscriber.channels.get(name);
    channel.subscribe((message) => received.push(view(message)));
    await channel.attach();
    const out = publisher.channels.get(name);
    await out.publish('single', { n: 1 });
    await out.publish([{ name: 'b1', data: 1 }, { name: 'b2', data: 'two' }]);
    await out.publish('eph', 'fleeting', { ephemeral: true });
    // Many small publishes at once: the SDK auto-batches them into few frames.
    await Promise.all(Array.from({ length: 50 }, (_, index) => out.publish('many', index)));
    await until(() => received.length >= 54, `54 messages (got ${received.length})`);
    await new Promise((resolve) => setTimeout(resolve, 200)); // any duplicate would show now
    await subscriber.close();
    await publisher.close();
    return { received };
  },

  async 'name-filter'() {
    const subscriber = client(A);
    const publisher = client(B);
    const name = `filter:${run}`;
    const wanted = [];
    const all = [];
    const channel = subscriber.channels.get(name);
    channel.subscribe('wanted', (message) => wanted.push(message.data));
    channel.subscribe((message) => all.push(message.data));
    await channel.attach();
    const out = publisher.channels.get(name);
    for (const [event, data] of [['wanted', 1], ['other', 2], ['wanted', 3]]) {
      await out.publish(event, data);
    }
    await until(() => all.length === 3, 'three messages');
    await subscriber.close();
    await publisher.close();
    return { wanted, all };
  },

  async 'errors'() {
    const token = await createJwt(
      { clientId: 'sdk-limited', capability: { 'chat:*': ['subscribe'] } }, { key: KEY },
    );
    const realtime = client(A, { token });
    await realtime.connect();
    const errors = [];
    realtime.connection.on((state, reason) => { if (reason) errors.push(String(reason.message ?? reason)); });
    const result = {
      publishDenied: await errorOf(realtime.channels.get('chat:1').publish('x', 1, { ephemeral: true })),
      attachDenied: await errorOf(realtime.channels.get(`other${run}`).attach()),
      historyDenied: await errorOf(realtime.channels.get('chat:1').history()),
      attachAllowed: await errorOf(realtime.channels.get(`chat:${run}`).attach()),
      // A malformed request the SDK would never build: the server answers 40001.
      malformed: await errorOf(realtime.connection['publish']({ t: 'pub', channel: 'bad name', name: 'x', data: 1 })),
    };
    result.stateAfter = realtime.getState();
    await realtime.close();
    return result;
  },

  async 'publish-rate'() {
    // RT_LIMITED: a gateway allowing each connection 5 publishes at once, then 5 per second.
    // The SDK publishes one message at a time, faster than that: the excess publishes reject
    // with 42900 (each refusal holds the connection's input for a token's time, so about
    // every other one after the burst) while the connection stays connected, and nothing
    // refused is delivered.
    const name = `rate:${run}`;
    const subscriber = client(A, { clientId: 'sdk-rate-sub' });
    const received = [];
    const channel = subscriber.channels.get(name);
    channel.subscribe((message) => received.push(message.data));
    await channel.attach();
    const publisher = client(process.env.RT_LIMITED, { clientId: 'sdk-rate-pub' });
    await publisher.connect();
    const connectionId = publisher.getConnectionId();
    const states = [];
    publisher.connection.on((state) => states.push(state));
    const out = publisher.channels.get(name);
    const outcomes = [];
    for (let index = 0; index < 20; index++) {
      const error = await errorOf(out.publish('n', index));
      outcomes.push(error === null ? 'ok' : error.message);
    }
    const accepted = outcomes.flatMap((outcome, index) => (outcome === 'ok' ? [index] : []));
    // A token comes back after 200 ms: publishing works again on the same connection.
    await new Promise((resolve) => setTimeout(resolve, 400));
    const afterPause = await errorOf(out.publish('n', 'after'));
    await until(() => received.length >= accepted.length + 1, 'the accepted messages');
    await new Promise((resolve) => setTimeout(resolve, 200)); // a refused one would show now
    const result = {
      outcomes,
      accepted,
      afterPause,
      received: [...received],
      states: [...states], // before close() adds its own
      state: publisher.getState(),
      sameConnection: publisher.getConnectionId() === connectionId,
    };
    await publisher.close();
    await subscriber.close();
    return result;
  },

  async 'cipher'() {
    const key = await generateRandomKey();
    const name = `secret:${run}`;
    const reader = client(A);
    const writer = client(B);
    const eavesdropper = client(A);
    const decrypted = [];
    const raw = [];
    const channel = reader.channels.get(name, { cipher: { key } });
    channel.subscribe((message) => decrypted.push(view(message)));
    await channel.attach();
    const plain = eavesdropper.channels.get(name);
    plain.subscribe((message) => raw.push(view(message)));
    await plain.attach();
    const secret = { text: 'über geheim ✓', n: [1, 2, 3] };
    await writer.channels.get(name, { cipher: { key } }).publish('s', secret);
    await until(() => decrypted.length === 1 && raw.length === 1, 'encrypted message');
    const history = await reader.channels.get(name).history();
    await reader.close();
    await writer.close();
    await eavesdropper.close();
    return { decrypted, raw, history: history.messages.map(view), secret };
  },
};

const scenario = scenarios[process.argv[2]];
if (!scenario) {
  console.error(`unknown scenario ${process.argv[2]}`);
  process.exit(2);
}
const result = await Promise.race([scenario(), deadline(45000, process.argv[2])]);
console.log(JSON.stringify(result));
process.exit(0);
