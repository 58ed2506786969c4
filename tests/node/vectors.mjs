// Golden vectors made by the real @foony/realtime 0.16.0 codec (not exported from the package
// entry, so imported by file path). Prints a JSON array of {name, direction, hex, frame}:
// `hex` is the bare record payload (no length prefix); `frame` is the SDK's decoded object
// (server frames) or the encoded input (client frames).
const binary = await import(new URL('../node_modules/@foony/realtime/lib/binary.js', import.meta.url).href);

const BIG = 2 ** 53 - 1;
const LONG = 'ß✓'.repeat(100);
const members = [{ name: 'a', data: { i: 1 } }, { name: 'b', data: 'two', encoding: 'enc' }];

const client = {
  'auth-key': { t: 'auth', key: 'app.k1:secret', clientId: 'alice' },
  'auth-token-resume': { t: 'auth', token: 'h.p.s', resumeConnectionId: 'conn-9' },
  'auth-empty': { t: 'auth' },
  'sub': { t: 'sub', id: 3, channel: 'chat:1' },
  'sub-resume-big': { t: 'sub', id: BIG, channel: 'chat:1', lastSerial: BIG },
  'unsub': { t: 'unsub', id: 300, channel: 'c' },
  'pub-single': { t: 'pub', id: 7, channel: 'room:1', name: 'chat', data: { hi: 'there' }, messageId: 'm-1' },
  'pub-ephemeral': { t: 'pub', id: 8, channel: 'room:1', name: 'typing', data: null, messageId: 'm-e', ephemeral: true },
  'pub-absent-data': { t: 'pub', id: 9, channel: 'room:1', name: '', data: undefined, messageId: '' },
  'pub-unicode': { t: 'pub', id: 128, channel: 'ü', name: LONG, data: { 'ключ': '值', e: '🙂' }, encoding: 'cipher+aes-256-gcm/base64', messageId: '1700000000000-0a1b2c3d' },
  'pub-batch': { t: 'pub', id: 10, channel: 'room:1', name: '', data: null, messageId: 'm-2', messages: members },
  'pub-batch-ephemeral': { t: 'pub', id: 11, channel: 'room:1', name: '', data: null, messageId: 'm-3', ephemeral: true, messages: [{ name: '', data: undefined }] },
  'pub-empty-array': { t: 'pub', id: 12, channel: 'c', name: '', data: null, messageId: 'm-4', messages: [] },
  'pres-enter': { t: 'pres', id: 13, channel: 'c', action: 'enter', data: { n: 'A' } },
  'pres-update-enc': { t: 'pres', id: 14, channel: 'c', action: 'update', data: 'q83v', encoding: 'cipher+aes-128-gcm/base64' },
  'pres-leave': { t: 'pres', id: 15, channel: 'c', action: 'leave' },
  'presSub': { t: 'presSub', id: 16, channel: 'c' },
  'presUnsub': { t: 'presUnsub', id: 17, channel: 'c' },
  'hist': { t: 'hist', id: 18, channel: 'c' },
  'hist-paged': { t: 'hist', id: 19, channel: 'c', limit: 1000, before: 123456 },
  'fetch': { t: 'fetch', id: 20, channel: 'c', fromSerial: 41 },
  'ping': { t: 'ping' },
};

const message = { t: 'msg', channel: 'room:1', name: 'chat', data: { hi: 'there', n: 42 }, timestamp: 1782955142000, messageId: '1782955142000000000-1a2b3c4d', clientId: 'client-7', seq: 12345, ephemeral: true };
const batch = { t: 'msg', channel: 'room:1', name: '', data: undefined, timestamp: 1782955142000, messageId: 'bat', clientId: 'client-7', seq: BIG, messages: members };
const server = {
  'connected': { t: 'connected', connectionId: 'conn-1', keepAliveMs: 15000, clientId: 'alice' },
  'ack': { t: 'ack', id: 3 },
  'ack-seq': { t: 'ack', id: 5, seq: 42 },
  'ack-resumed-true': { t: 'ack', id: 3, resumed: true },
  'ack-resumed-false': { t: 'ack', id: BIG, resumed: false },
  'msg': message,
  'msg-absent-fields': { t: 'msg', channel: 'c', name: '', data: undefined, timestamp: 0, messageId: '' },
  'msg-unicode': { ...message, name: LONG, data: ['✓', { 'ключ': null }], encoding: 'cipher+aes-256-gcm/base64', ephemeral: false },
  'batch': batch,
  'batch-ephemeral': { ...batch, ephemeral: true, seq: 0 },
  'bundle': { t: 'msg', channel: 'room:1', name: '', data: undefined, timestamp: 0, messageId: '', bundle: [
    { name: 'a', data: { i: 1 }, timestamp: 100, messageId: 'id-1', clientId: 'c1', seq: 5 },
    { name: 'b', data: 'two', timestamp: 101, messageId: 'id-2', clientId: 'c2', seq: 6, ephemeral: true },
    { name: '', data: undefined, timestamp: 102, messageId: 'bat', clientId: 'c3', seq: 7, messages: members },
  ] },
  'presEvt-enter': { t: 'presEvt', action: 'enter', timestamp: 1700000000000, channel: 'chat:1', clientId: 'alice', connectionId: 'conn-1', data: { n: 'A' } },
  'presEvt-leave-enc': { t: 'presEvt', action: 'leave', timestamp: 1, channel: 'c', clientId: 'u', connectionId: 'k', data: 'q83v', encoding: 'cipher+aes-256-gcm/base64' },
  'presEvt-update-nodata': { t: 'presEvt', action: 'update', timestamp: 2, channel: 'c', clientId: 'u', connectionId: 'k' },
  'err-unscoped': { t: 'err', id: 0, code: 40101, message: 'bad token' },
  'err-scoped': { t: 'err', id: 77, code: 40302, message: 'capability does not cover channel ✓' },
  'pong': { t: 'pong' },
  'histRes-empty': { t: 'histRes', id: 4, channel: 'c', messages: [] },
  'histRes-more': { t: 'histRes', id: 4, channel: 'room:1', messages: [{ ...message, ephemeral: false }, batch], more: true },
  'fetchRes-resumed': { t: 'fetchRes', id: 9, channel: 'room:1', messages: [{ ...message, ephemeral: false }], resumed: true },
  'fetchRes-not-resumed': { t: 'fetchRes', id: 9, channel: 'c', messages: [], resumed: false },
};

const hex = (bytes) => Buffer.from(bytes).toString('hex');
const vectors = [];
for (const [name, frame] of Object.entries(client)) {
  vectors.push({ name, direction: 'client', hex: hex(binary.encodeClientFrame(frame)), frame });
}
for (const [name, frame] of Object.entries(server)) {
  const record = binary.encodeServerFrame(frame);
  const [decoded] = binary.decodeServerFrames(binary.frameBinaryRecord(record).buffer);
  vectors.push({ name, direction: 'server', hex: hex(record), frame: decoded });
}
process.stdout.write(JSON.stringify(vectors));
