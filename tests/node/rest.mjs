// REST scenarios: the unmodified @foony/realtime 0.16.0 `Rest` client against our gateways.
// Usage: node rest.mjs <scenario>; env RT_A / RT_B (ws:// endpoints of two gateways), RT_KEY
// (API key). Prints one JSON object (the scenario's observations) on the last line; pytest
// (tests/interop/test_sdk_rest.py) makes the assertions.
import { Realtime, Rest } from '@foony/realtime';
import WebSocket from 'ws';
import { deadline, errorOf, until } from './helpers.mjs';

const A = process.env.RT_A;
const B = process.env.RT_B;
const KEY = process.env.RT_KEY;
const run = Math.random().toString(36).slice(2, 10);
// The REST client takes the service's http base URL; the gateways serve it on the same port.
const httpOf = (endpoint) => endpoint.replace(/^ws/u, 'http');

function realtime(endpoint, options = {}) {
  return new Realtime({
    endpoint,
    webSocket: WebSocket,
    transport: 'websocket',
    ...(options.token || options.authCallback ? {} : { key: KEY }),
    ...options,
  });
}

function rest(endpoint, options = {}) {
  return new Rest({ endpoint: httpOf(endpoint), ...(options.token || options.authCallback ? {} : { key: KEY }), ...options });
}

function view(message) {
  return {
    name: message.name, data: message.data, messageId: message.messageId,
    clientId: message.clientId ?? null, seq: message.seq ?? null,
  };
}

/** Every page of a history read, following `next()` as an application would. */
async function allPages(first) {
  const pages = [];
  let page = first;
  while (page !== null) {
    pages.push({ data: page.items.map((item) => item.data), hasNext: page.hasNext(), isLast: page.isLast() });
    page = await page.next();
    if (pages.length > 20) throw new Error('too many pages');
  }
  return pages;
}

const scenarios = {
  async 'publish-live'() {
    // A REST publish through gateway B reaches a WebSocket subscriber on gateway A, exactly
    // like a WebSocket publish (PROTOCOL.md 3.10).
    const name = `rest-live:${run}`;
    const subscriber = realtime(A, { clientId: 'ws-sub' });
    const received = [];
    const channel = subscriber.channels.get(name);
    channel.subscribe((message) => received.push(view(message)));
    await channel.attach();
    const client = rest(B, { clientId: 'rest-pub' });
    const restChannel = client.channels.get(name);
    const single = await restChannel.publish('single', { n: 1 });
    const batch = await restChannel.publish([{ name: 'b1', data: 1 }, { name: 'b2', data: 'two' }]);
    const withId = await restChannel.publish({ name: 'once', data: 3, id: `fixed-${run}` });
    const again = await restChannel.publish({ name: 'once', data: 3, id: `fixed-${run}` });
    const ephemeral = await restChannel.publish({ name: 'eph', data: 4, ephemeral: true });
    await until(() => received.length >= 5, 'five live messages');
    await new Promise((resolve) => setTimeout(resolve, 200)); // the duplicate must not arrive
    const time = await client.time();
    await subscriber.close();
    return { single, batch, withId, again, ephemeral, received, time, now: Date.now() };
  },

  async 'history-paging'() {
    const name = `rest-history:${run}`;
    const client = rest(A);
    const channel = client.channels.get(name);
    for (let value = 1; value <= 7; value++) {
      await channel.publish('n', value);
    }
    await channel.publish([{ name: 'b', data: 8 }, { name: 'b', data: 9 }]);
    const other = rest(B);
    const backwards = await allPages(await other.channels.get(name).history({ limit: 3 }));
    const forwards = await allPages(await other.channels.get(name).history({ limit: 3, direction: 'forwards' }));
    const bounded = await allPages(await other.channels.get(name).history({ limit: 2, before: 4 }));
    const first = await other.channels.get(name).history({ limit: 1 });
    const item = first.items[0];
    return { backwards, forwards, bounded, item };
  },

  async 'presence-get'() {
    const name = `rest-presence:${run}`;
    const members = [realtime(A, { clientId: 'ann' }), realtime(A, { clientId: 'bob' }), realtime(B, { clientId: 'bob' })];
    for (const [index, member] of members.entries()) {
      const channel = member.channels.get(name);
      await channel.attach();
      await channel.presence.enter({ index });
    }
    const connectionIds = members.map((member) => member.getConnectionId());
    const presence = rest(B).channels.get(name).presence;
    // Entered members become visible through the KV bucket, then everywhere.
    let all = null;
    const started = Date.now();
    while (Date.now() - started < 5000) {
      all = await presence.get();
      if (all.items.length === 3) break;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const summary = (page) => page.items.map((m) => [m.clientId, m.connectionId, m.action, m.data ?? null]);
    const result = {
      connectionIds,
      all: summary(all),
      allIsLast: all.isLast(),
      timestamps: all.items.map((m) => m.timestamp),
      bobs: summary(await presence.get({ clientId: 'bob' })),
      byConnection: summary(await presence.get({ connectionId: connectionIds[2] })),
      limited: summary(await presence.get({ clientId: 'bob', limit: 1 })),
      nobody: summary(await presence.get({ clientId: 'nobody' })),
    };
    for (const member of members) await member.close();
    return result;
  },

  async 'request-token'() {
    // Mint a token with the key over REST, then connect a Realtime client with it and use
    // it for REST too.
    const name = `chat:token-${run}`;
    const keyed = rest(A);
    const details = await keyed.auth.requestToken({
      clientId: 'token-user',
      ttl: 120000,
      capability: { 'chat:*': ['subscribe', 'publish', 'presence'] },
    });
    const connected = realtime(B, { token: details.token });
    await connected.connect();
    const received = [];
    const channel = connected.channels.get(name);
    channel.subscribe((message) => received.push(view(message)));
    await channel.attach();
    await channel.publish('over-ws', 1);
    const tokenRest = rest(A, { token: details.token });
    const published = await tokenRest.channels.get(name).publish('over-rest', 2);
    await until(() => received.length === 2, 'both messages');
    // authCallback: the SDK fetches a token before its first request.
    let callbacks = 0;
    const viaCallback = rest(B, {
      authCallback: async () => {
        callbacks += 1;
        return (await keyed.auth.requestToken({ clientId: 'callback-user' })).token;
      },
    });
    const callbackPublish = await viaCallback.channels.get(name).publish('via-callback', 3);
    await until(() => received.length === 3, 'the callback client\'s message');
    const result = {
      details,
      state: connected.getState(),
      clientId: connected.connection.getClientId(),
      received,
      published,
      callbackPublish,
      callbacks,
    };
    await connected.close();
    return result;
  },

  async 'errors'() {
    const keyed = rest(A);
    const { token } = await keyed.auth.requestToken({
      clientId: 'limited-user',
      capability: { 'chat:*': ['subscribe'] },
    });
    const limited = rest(B, { token });
    const publisher = rest(B, {
      token: (await keyed.auth.requestToken({ clientId: 'publisher', capability: { 'chat:*': ['publish'] } })).token,
    });
    return {
      publishDenied: await errorOf(limited.channels.get('chat:x').publish('n', 1)),
      channelDenied: await errorOf(limited.channels.get('elsewhere').history()),
      historyDenied: await errorOf(limited.channels.get('chat:x').history()),
      presenceAllowed: (await limited.channels.get('chat:x').presence.get()).items,
      clientIdMismatch: await errorOf(publisher.channels.get('chat:x').publish({ name: 'n', data: 1, clientId: 'other' })),
      badKey: await errorOf(rest(A, { key: KEY.split(':')[0] + ':wrong' }).channels.get('chat:x').history()),
      badChannel: await errorOf(keyed.channels.get('no spaces').publish('n', 1)),
    };
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
