// A real browser (Debian's headless Chromium, driven by playwright-core) on a page served from
// another origin than the gateway: the unmodified SDK connects over long-polling, receives a
// message and reads REST history. It only works if the gateway answers CORS preflights and
// exposes `foony-lp-session` (PROTOCOL.md section 9 item 28).
// Usage: node browser.mjs; env RT_A (ws:// endpoint of a gateway), RT_KEY (API key).
// Prints one JSON object on the last line; pytest makes the assertions.
import { readFile } from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { Realtime } from '@foony/realtime';
import WebSocket from 'ws';

const A = process.env.RT_A;
const KEY = process.env.RT_KEY;
const run = Math.random().toString(36).slice(2, 10);
const SDK_LIB = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'node_modules', '@foony', 'realtime', 'lib');

const PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>cross-origin long-polling</title></head>
<body><script type="module">
  import { Realtime, Rest } from '/sdk/index.js';
  window.startClient = async (endpoint, key, channelName) => {
    const realtime = new Realtime({ endpoint, key, clientId: 'browser', transport: 'long-polling' });
    window.received = [];
    const channel = realtime.channels.get(channelName);
    channel.subscribe((message) => window.received.push({ name: message.name, data: message.data }));
    await channel.attach();
    window.realtime = realtime;
    return realtime.getState();
  };
  // REST from the page: Authorization and JSON bodies are preflighted, and paging needs the
  // Link header exposed.
  window.restPages = async (endpoint, key, channelName) => {
    const rest = new Rest({ endpoint: endpoint.replace(/^ws/u, 'http'), key });
    const channel = rest.channels.get(channelName);
    await channel.publish('rest', { via: 'rest' });
    const pages = [];
    let page = await channel.history({ limit: 1 });
    while (page) {
      pages.push(page.items.map((message) => message.name));
      page = page.hasNext() ? await page.next() : null;
    }
    return pages;
  };
</script></body></html>`;

/** Serves the page and the SDK's ES modules from an origin other than the gateway's. */
async function pageServer() {
  const server = http.createServer(async (request, response) => {
    try {
      if (request.url === '/favicon.ico') {
        response.writeHead(204);
        response.end();
        return;
      }
      if (request.url === '/') {
        response.writeHead(200, { 'content-type': 'text/html' });
        response.end(PAGE);
        return;
      }
      if (request.url.startsWith('/sdk/')) {
        const file = path.normalize(request.url.slice('/sdk/'.length)).replace(/^(\.\.[/\\])+/u, '');
        const body = await readFile(path.join(SDK_LIB, file));
        response.writeHead(200, { 'content-type': 'text/javascript' });
        response.end(body);
        return;
      }
    } catch {
      // fall through to 404
    }
    response.writeHead(404);
    response.end();
  });
  // 'localhost' for the page, 127.0.0.1 for the gateway: different origins on loopback.
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, origin: `http://localhost:${server.address().port}` };
}

async function until(predicate, what, ms = 15000) {
  const started = Date.now();
  while (!(await predicate())) {
    if (Date.now() - started > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

const { server, origin } = await pageServer();
const browser = await chromium.launch({
  executablePath: process.env.RT_CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
const result = { origin };
try {
  const page = await browser.newPage();
  const failures = [];
  page.on('requestfailed', (request) => failures.push(`${request.method()} ${request.url()}: ${request.failure()?.errorText}`));
  page.on('console', (message) => {
    if (message.type() === 'error') failures.push(`console: ${message.text()} (${message.location().url})`);
  });
  await page.goto(`${origin}/`);
  const name = `browser:${run}`;
  result.state = await page.evaluate(
    ([endpoint, key, channelName]) => window.startClient(endpoint, key, channelName),
    [A, KEY, name],
  );
  // A Node publisher on the WebSocket path: the browser must see it through its poll lane.
  const publisher = new Realtime({ endpoint: A, key: KEY, webSocket: WebSocket, transport: 'websocket', clientId: 'node' });
  await publisher.channels.get(name).publish('greeting', { hello: 'browser' });
  await until(async () => (await page.evaluate(() => window.received.length)) >= 1, 'message in the browser');
  result.received = await page.evaluate(() => window.received);
  // The browser publishes too (its send lane), and the node side sees it.
  const seen = [];
  const nodeChannel = publisher.channels.get(name);
  nodeChannel.subscribe((message) => seen.push(message.data));
  await nodeChannel.attach();
  await page.evaluate((channelName) => window.realtime.channels.get(channelName).publish('reply', { from: 'browser' }), name);
  await until(async () => seen.length >= 1, 'browser publish seen by node');
  result.seenFromBrowser = [...seen];
  result.restPages = await page.evaluate(
    ([endpoint, key, channelName]) => window.restPages(endpoint, key, channelName),
    [A, KEY, name],
  );
  result.failures = [...failures]; // before close, which aborts the held poll on purpose
  await page.evaluate(() => window.realtime.close());
  await publisher.close();
} finally {
  await browser.close();
  server.close();
}
console.log(JSON.stringify(result));
process.exit(0);
