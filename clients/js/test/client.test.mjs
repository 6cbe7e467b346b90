// The client end to end without a broker: a FakeBroker stands in for mqtt.js, FakeApi is
// skusync's [api] on a real node:http server, fetched with the global fetch.
import { test, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { createClient, ApiError } from '../build/index.js';
import { FakeApi, FakeBroker, rev, stored, state, gone, alert, waitFor, nextCatchUp } from './helpers.mjs';

const P = 'shop';
let api, apiUrl, broker, client;

beforeEach(async () => {
  api = new FakeApi();
  apiUrl = await api.listen();
  broker = new FakeBroker();
  client = null;
});
afterEach(async () => {
  await client?.close();
  await api.close();
});

function start(extra = {}) {
  client = createClient({
    mqttUrl: 'ws://broker.test', apiUrl, prefix: P, connect: broker.connect,
    retry: { minMs: 5, maxMs: 20 }, pageSize: 2, ...extra,
  });
  const log = { states: [], alerts: [], errors: [], connection: [], status: [] };
  client.onState((sku, s, info) => log.states.push({ sku, rev: s?.rev ?? null, available: s?.available, ...info }));
  client.onAlert((a) => log.alerts.push(a.id));
  client.onError((e) => log.errors.push(e));
  client.onConnection((c) => log.connection.push(c));
  client.onStatus((s) => log.status.push(s));
  return log;
}

// Publishes on MQTT and records in the API, like skusync does.
function change(s) {
  api.set(s);
  broker.publishState(P, s);
}

const ids = (log) => log.states.map((e) => [e.sku, e.rev]);
const snapshot = (c) => Object.fromEntries([...c.states()].map(([k, v]) => [k, v.rev]).sort());
const expected = () => Object.fromEntries([...api.current()].map(([k, v]) => [k, v.rev]).sort());

test('connect: mqtt.js options, subscriptions, then a full catch-up', async () => {
  const A1 = state('A', rev(1), { available: 1 });
  const B1 = state('a/b', rev(2));
  change(A1);
  api.set(B1); // the broker lost this retained message: only the API has it
  broker.publish(`${P}/status`, Buffer.from('online'), {}, { retain: true });
  const log = start({ mqtt: { username: 'u', clean: true } });
  assert.equal(broker.client, null, 'connects asynchronously');
  await waitFor(() => broker.client, 'connect');
  assert.equal(broker.url, 'ws://broker.test');
  assert.equal(broker.options.protocolVersion, 5);
  assert.equal(broker.options.username, 'u');
  assert.equal(broker.options.resubscribe, false);
  const done = nextCatchUp(client);
  broker.up();
  const r = await done;
  assert.deepEqual(broker.subscriptions, [{ topics: [`${P}/sku/+`, `${P}/alerts/+`, `${P}/status`], opts: { qos: 1 } }]);
  assert.equal(r.full, true);
  assert.deepEqual(snapshot(client), { A: A1.rev, 'a/b': B1.rev });
  assert.deepEqual(log.status, ['online']);
  assert.deepEqual(log.connection, ['connecting', 'connected']);
  assert.deepEqual(api.requests.map((q) => [q.path, q.since, q.limit]),
    [['/v1/changes', null, 2], ['/v1/alerts', null, 2]]);
  assert.equal(api.requests[0].auth, null, 'no token, no Authorization');
  assert.deepEqual(log.errors, []);
});

test('reconnect: catch-up via /v1/changes fills in exactly the missed states; alerts deduped', async () => {
  const A1 = state('A', rev(10), { available: 10 });
  const B1 = state('B', rev(11), { available: 20 });
  const C1 = state('C', rev(12), { available: 30 });
  const E1 = state('E', rev(13), { available: 40 });
  for (const s of [A1, B1, C1, E1]) change(s);
  const a1 = alert('C', '1764061200000-0');
  api.alerts.push(a1);
  const log = start();
  await waitFor(() => broker.client, 'connect');
  let done = nextCatchUp(client);
  broker.up();
  const first = await done;
  // 4 retained states (MQTT or HTTP, whichever came first) and the alert history
  assert.equal(first.full, true);
  assert.deepEqual(snapshot(client), expected());
  assert.equal(log.states.length, 4);
  assert.deepEqual(log.alerts, [a1.id]);
  // paged: 4 SKUs at 2 per page
  assert.deepEqual(api.requests.filter((q) => q.path === '/v1/changes').map((q) => q.since), [null, 'c2']);

  // live: a contiguous change carries its delta
  const A2 = state('A', rev(20), { available: 8 }, { base: A1.rev, delta: { available: -2 } });
  change(A2);
  assert.deepEqual(log.states.at(-1), { sku: 'A', rev: A2.rev, available: 8, delta: { available: -2 }, gap: false, previous: A1 });

  // offline: the broker keeps the session but drops what was queued (the worst case)
  broker.down();
  const A3 = state('A', rev(30), { available: 5 }, { base: A2.rev });
  const D1 = state('D', rev(31), { available: 1 });
  change(A3);
  change(D1);
  api.set(gone('B', rev(32)));
  broker.publishGone(P, 'B', rev(32));
  const a2 = alert('A', '1764061200001-0');
  const a3 = alert('A', '1764061200001-1', 'out_of_stock');
  api.alerts.push(a2, a3);
  broker.publishAlert(P, a2);
  assert.equal(log.states.length, 5, 'nothing arrives while offline');
  const before = api.requests.length;
  const states = log.states.length;

  done = nextCatchUp(client);
  broker.up({ sessionPresent: true });
  const second = await done;
  assert.equal(broker.subscriptions.length, 1, 'a resumed session keeps its subscriptions');
  assert.equal(second.full, false);
  assert.equal(second.changes, 3);
  assert.equal(second.alerts, 2);
  // exactly the missed changes, oldest first, each once
  assert.deepEqual(ids({ states: log.states.slice(states) }), [['A', A3.rev], ['D', D1.rev], ['B', null]]);
  assert.equal(log.states.at(-1).previous.available, 20, 'gone reports the state it removed');
  assert.deepEqual(snapshot(client), expected());
  assert.equal(client.state('B'), null);
  const reqs = api.requests.slice(before);
  assert.deepEqual(reqs.map((q) => [q.path, q.since]), [
    ['/v1/changes', 'c4'], ['/v1/changes', 'c7'], ['/v1/alerts', a1.seq],
  ]);
  assert.deepEqual(log.alerts, [a1.id, a2.id, a3.id]);

  // the queued alert arrives late over MQTT after all: a duplicate
  broker.publishAlert(P, a2);
  broker.publishAlert(P, { ...a1 });
  assert.deepEqual(log.alerts, [a1.id, a2.id, a3.id]);
  // a late old state after the catch-up: ignored
  broker.publishState(P, A2);
  assert.equal(client.state('A').rev, A3.rev);
  assert.deepEqual(log.errors, []);
});

test('alerts: one arriving live right after a reconnect does not skip those missed offline', async () => {
  change(state('A', rev(1)));
  const log = start();
  await waitFor(() => broker.client, 'connect');
  let done = nextCatchUp(client);
  broker.up();
  await done;
  const cursor = '0-0'; // the first catch-up's page: no alerts yet
  // live after a catch-up: seen, the cursor stays
  const a1 = alert('A', '1000-0');
  api.alerts.push(a1);
  broker.publishAlert(P, a1);
  broker.down();
  const a2 = alert('B', '2000-0'); // missed while offline
  const a3 = alert('C', '3000-0');
  api.alerts.push(a2, a3);
  const before = api.requests.length;
  done = nextCatchUp(client);
  broker.up();
  broker.publishAlert(P, a3); // arrives before the catch-up asks /v1/alerts
  await done;
  const q = api.requests.slice(before).find((r) => r.path === '/v1/alerts');
  assert.equal(q.since, cursor);
  assert.deepEqual(log.alerts, [a1.id, a3.id, a2.id]);
});

test('alerts: a live alert does not move the cursor past an earlier one of another SKU still on its way', async () => {
  const storage = new Map();
  const log = start({ storage: { get: (k) => storage.get(k), set: (k, v) => { storage.set(k, v); } } });
  const a0 = alert('Z', '50-0');
  api.alerts.push(a0);
  await waitFor(() => broker.client, 'connect');
  let done = nextCatchUp(client);
  broker.up();
  await done;
  assert.equal(storage.get(`skusync:${P}:alerts`), '50-0');
  // A raises first but waits out its publish round; B's alert goes out at once
  const aA = alert('A', '100-0');
  const aB = alert('B', '101-0');
  api.alerts.push(aA, aB);
  broker.publishAlert(P, aB);
  assert.deepEqual(log.alerts, [a0.id, aB.id]);
  assert.equal(storage.get(`skusync:${P}:alerts`), '50-0', 'a live alert is not a position');
  // the connection is lost before A's round: the broker keeps nothing for a clean session
  broker.down();
  const before = api.requests.length;
  done = nextCatchUp(client);
  broker.up();
  await done;
  const q = api.requests.slice(before).find((r) => r.path === '/v1/alerts');
  assert.equal(q.since, '50-0');
  assert.deepEqual(log.alerts, [a0.id, aB.id, aA.id], 'A fetched once, B not again');
  assert.equal(storage.get(`skusync:${P}:alerts`), '101-0');
});

test('a restarted process resuming a persistent session subscribes again for the retained states', async () => {
  change(state('A', rev(1)));
  change(state('B', rev(2)));
  api.alerts.push(alert('A', '5-0'));
  const storage = { [`skusync:${P}:changes`]: 'c2', [`skusync:${P}:alerts`]: '5-0' };
  start({ mqtt: { clean: false }, storage: { get: async (k) => storage[k], set: async (k, v) => { storage[k] = v; } } });
  await waitFor(() => broker.client, 'connect');
  let done = nextCatchUp(client);
  broker.up({ sessionPresent: true }); // the broker kept the session of the last process
  await done;
  await waitFor(() => client.states().size === 2, 'retained states');
  assert.deepEqual(snapshot(client), expected(), 'the unchanged SKUs come from the retained messages');
  assert.equal(broker.subscriptions.length, 1);
  // a later resumed session of the same process keeps its subscriptions
  broker.down();
  done = nextCatchUp(client);
  broker.up({ sessionPresent: true });
  await done;
  assert.equal(broker.subscriptions.length, 1);
});

test('410: a token from before the index was rebuilt takes the full state again', async () => {
  const storage = new Map();
  const log = start({ storage: { get: (k) => storage.get(k), set: (k, v) => { storage.set(k, v); } } });
  for (const s of [state('A', rev(1)), state('B', rev(2)), state('C', rev(3))]) change(s);
  api.alerts.push(alert('A', '100-0'), alert('B', '100-1'));
  await waitFor(() => broker.client, 'connect');
  let done = nextCatchUp(client);
  broker.up();
  await done;
  assert.deepEqual(Object.keys(snapshot(client)), ['A', 'B', 'C']);
  assert.equal(storage.get(`skusync:${P}:changes`), 'c3');
  assert.equal(storage.get(`skusync:${P}:alerts`), '100-1');

  broker.down();
  const C2 = state('C', rev(10), { available: 2 });
  change(C2);
  api.forget('B'); // gone, but the rebuilt index has no trace of it
  api.rebuild();
  api.alerts.splice(0, 2, alert('C', '200-0')); // history trimmed past our seq
  api.alertMin = '150-0';
  const before = api.requests.length;
  const n = log.states.length;
  done = nextCatchUp(client);
  broker.up({ sessionPresent: true });
  const r = await done;
  assert.equal(r.full, true);
  assert.deepEqual(api.requests.slice(before).map((q) => [q.path, q.since, q.auth]), [
    ['/v1/changes', 'c3', null], ['/v1/changes', null, null],
    ['/v1/alerts', '100-1', null], ['/v1/alerts', null, null],
  ]);
  assert.deepEqual(ids({ states: log.states.slice(n) }), [['C', C2.rev], ['B', null]]);
  assert.deepEqual(snapshot(client), expected());
  assert.deepEqual(log.alerts, ['0/1:low_stock:A', '0/1:low_stock:B', '0/1:low_stock:C']);
  assert.equal(storage.get(`skusync:${P}:changes`), 'c4');
  assert.equal(storage.get(`skusync:${P}:alerts`), '200-0');
});

test('410 after a rebuild onto lower LSNs: the full listing replaces the newer-looking states', async () => {
  start({ pageSize: 10 }); // one page: the fake's page tokens would be older than its rebuild
  for (const s of [state('A', rev(100)), state('B', rev(101)), state('C', rev(102))]) change(s);
  await waitFor(() => broker.client, 'connect');
  let done = nextCatchUp(client);
  broker.up();
  await done;
  assert.deepEqual(snapshot(client), { A: rev(100), B: rev(101), C: rev(102) });
  broker.down();
  // a failover to a standby that was behind: the rebuild republishes lower revs
  change(state('A', rev(50), { available: 7 }));
  change(state('B', rev(51)));
  api.rebuild();
  done = nextCatchUp(client);
  broker.up({ sessionPresent: true });
  const r = await done;
  assert.equal(r.full, true);
  // C was not rebuilt lower (its rev stands); A and B are the rebuilt states
  assert.deepEqual(snapshot(client), { A: rev(50), B: rev(51), C: rev(102) });
  assert.equal(client.states().get('A').available, 7);
});

test('stored tokens: a restarted client continues from them', async () => {
  api.set(state('A', rev(1)), state('B', rev(2)));
  api.alerts.push(alert('A', '5-0'), alert('B', '6-0'));
  const storage = { [`skusync:${P}:changes`]: 'c1', [`skusync:${P}:alerts`]: '5-0' };
  const log = start({ storage: { get: async (k) => storage[k], set: async (k, v) => { storage[k] = v; } } });
  await waitFor(() => broker.client, 'connect');
  const done = nextCatchUp(client);
  broker.up();
  assert.equal((await done).full, false);
  assert.deepEqual(api.requests.map((q) => [q.path, q.since]), [['/v1/changes', 'c1'], ['/v1/alerts', '5-0']]);
  assert.deepEqual(ids(log), [['B', rev(2)]]);
  assert.deepEqual(log.alerts, ['0/1:low_stock:B']);
  assert.equal(storage[`skusync:${P}:changes`], 'c2');
  assert.equal(storage[`skusync:${P}:alerts`], '6-0');
});

test('failures: network, 503 and 429 are retried with back-off; MQTT keeps working meanwhile', async () => {
  const A1 = state('A', rev(1));
  change(A1);
  api.failures.push({ status: 503, retryAfter: '0' }, 'reset', { status: 429, retryAfter: '0' }, { status: 500 });
  const log = start();
  await waitFor(() => broker.client, 'connect');
  const done = nextCatchUp(client);
  broker.up();
  await waitFor(() => log.errors.length >= 2, 'two failures');
  const A2 = state('A', rev(2), { available: 3 }, { base: A1.rev });
  broker.publishState(P, A2);
  assert.equal(client.state('A').rev, A2.rev, 'MQTT applies while catch-up fails');
  await done;
  assert.deepEqual(log.errors.map((e) => [e.name, e.status, e.retryable]),
    [['ApiError', 503, true], ['ApiError', null, true], ['ApiError', 429, true], ['ApiError', 500, true]]);
  assert.ok(log.errors[0] instanceof ApiError);
  assert.match(log.errors[0].message, /HTTP 503: injected/);
  assert.equal(api.requests.filter((q) => q.path === '/v1/changes').length, 5);
  assert.equal(client.state('A').rev, A2.rev);
});

test('Retry-After is honoured', async () => {
  change(state('A', rev(1)));
  api.failures.push({ status: 503, retryAfter: '1' });
  start({ retry: { minMs: 1, maxMs: 2 } });
  await waitFor(() => broker.client, 'connect');
  const done = nextCatchUp(client, 5000);
  const t0 = Date.now();
  broker.up();
  await done;
  assert.ok(Date.now() - t0 >= 950, `waited ${Date.now() - t0} ms`);
});

test('token: sent as a bearer; a 401 is reported and not retried', async () => {
  api.token = 's3cret';
  change(state('A', rev(1)));
  let log = start({ token: 's3cret' });
  await waitFor(() => broker.client, 'connect');
  let done = nextCatchUp(client);
  broker.up();
  await done;
  assert.ok(api.requests.length >= 2);
  assert.ok(api.requests.every((q) => q.auth === 'Bearer s3cret'));
  assert.deepEqual(log.errors, []);
  await client.close();

  api.requests = [];
  broker = new FakeBroker();
  change(state('A', rev(1)));
  log = start({ token: 'wrong' });
  await waitFor(() => broker.client, 'connect');
  broker.up();
  await waitFor(() => log.errors.length === 1, '401 reported');
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(api.requests.length, 1, 'no retry loop on 401');
  assert.equal(log.errors[0].status, 401);
  assert.match(log.errors[0].message, /bad token/);
  assert.equal(client.state('A').rev, rev(1), 'MQTT still works');
});

test('gap: a missed message flags the gap, takes absolute values and runs a catch-up', async () => {
  const A1 = state('A', rev(1), { available: 10 });
  change(A1);
  const log = start();
  await waitFor(() => broker.client, 'connect');
  let done = nextCatchUp(client);
  broker.up();
  await done;
  const before = api.requests.length;
  const A2 = state('A', rev(2), { available: 9 }, { base: A1.rev });
  api.set(A2); // published while the broker dropped it
  const B1 = state('B', rev(3));
  api.set(B1); // also dropped
  const A3 = state('A', rev(4), { available: 7 }, { base: A2.rev, delta: { available: -2 } });
  done = nextCatchUp(client);
  change(A3);
  const e = log.states.at(-1);
  assert.equal(e.gap, true);
  assert.equal(e.delta, null);
  assert.equal(e.available, 7);
  await done;
  assert.deepEqual(api.requests.slice(before).map((q) => [q.path, q.since]), [['/v1/changes', 'c1'], ['/v1/alerts', '0-0']]);
  assert.equal(client.state('B').rev, B1.rev, 'the catch-up found what else was missed');
  assert.equal(client.state('A').rev, A3.rev);
});

test('chosen SKUs: their encoded topics only, and nothing else from catch-up', async () => {
  const AB = state('a/b', rev(1));
  const U = state('ünï', rev(2));
  const X = state('X', rev(3));
  for (const s of [AB, U, X]) api.set(s);
  broker.publishState(P, AB, { topicSku: 'a%2Fb' });
  broker.publishState(P, U, { topicSku: '%C3%BCn%C3%AF' });
  broker.publishState(P, X);
  api.alerts.push(alert('X', '1-0'), alert('a/b', '1-1'));
  const log = start({ skus: ['a/b', 'ünï', '', '100%'] });
  await waitFor(() => broker.client, 'connect');
  const done = nextCatchUp(client);
  broker.up();
  await done;
  assert.deepEqual(broker.subscriptions[0].topics, [
    `${P}/sku/a%2Fb`, `${P}/alerts/a%2Fb`, `${P}/sku/%C3%BCn%C3%AF`, `${P}/alerts/%C3%BCn%C3%AF`,
    `${P}/sku/%`, `${P}/alerts/%`, `${P}/sku/100%25`, `${P}/alerts/100%25`, `${P}/status`,
  ]);
  assert.deepEqual(Object.keys(snapshot(client)).sort(), ['a/b', 'ünï']);
  assert.deepEqual(log.alerts, ['0/1:low_stock:a/b']);
  // the empty SKU and "100%" arrive on their topics
  broker.publishState(P, state('', rev(5)), { topicSku: '%' });
  broker.publishState(P, state('100%', rev(6)), { topicSku: '100%25' });
  broker.publishGone(P, '%C3%BCn%C3%AF', rev(7));
  assert.deepEqual(Object.keys(snapshot(client)).sort(), ['', '100%', 'a/b']);
  assert.deepEqual(log.errors, []);
});

test('bad messages are reported and dropped; a throwing listener breaks nothing', async () => {
  change(state('A', rev(1)));
  const log = start({ apiUrl: undefined });
  client.onState(() => { throw new Error('listener bug'); });
  await waitFor(() => broker.client, 'connect');
  broker.up();
  await waitFor(() => client.state('A'), 'retained state');
  broker.publish(`${P}/sku/A`, Buffer.from('{"v":2,'), { contentType: 'application/json' });
  broker.publish(`${P}/sku/B`, Buffer.from(JSON.stringify({ v: 1, sku: 'B', lsn: '0/1' })));
  broker.publish(`${P}/sku/%ZZ`, Buffer.from('{}'));
  broker.publishState(P, state('C', rev(2)), { topicSku: 'D' });
  assert.equal(log.errors.length, 6, log.errors.map((e) => e.message).join('\n'));
  assert.match(log.errors[1].message, /dropped message on shop\/sku\/A/);
  assert.match(log.errors[2].message, /without rev/);
  assert.match(log.errors[4].message, /encoding mismatch/);
  assert.equal(log.errors[5].message, 'listener bug');
  assert.equal(client.state('C').rev, rev(2), 'keyed by the payload SKU');
  assert.equal(api.requests.length, 0, 'no apiUrl: no catch-up');
});

test('close: ends MQTT and stops a retrying catch-up', async () => {
  api.failures.push(...Array(100).fill({ status: 503 }));
  const log = start({ retry: { minMs: 50, maxMs: 50 } });
  await waitFor(() => broker.client, 'connect');
  broker.up();
  await waitFor(() => log.errors.length >= 1, 'a failure');
  await client.close();
  const n = api.requests.length;
  await new Promise((r) => setTimeout(r, 150));
  assert.equal(api.requests.length, n, 'no requests after close');
  assert.equal(broker.ended, true);
  client = null;
});

test('live alerts are followed by an /v1/alerts page: a restarted process does not report them again', async () => {
  const storage = new Map();
  const store = { get: (k) => storage.get(k), set: (k, v) => { storage.set(k, v); } };
  let log = start({ storage: store, alertFollowMs: 20 });
  await waitFor(() => broker.client, 'connect');
  const done = nextCatchUp(client);
  broker.up();
  await done;
  const a1 = alert('A', '100-0');
  api.alerts.push(a1);
  broker.publishAlert(P, a1);
  assert.deepEqual(log.alerts, [a1.id]);
  await waitFor(() => storage.get(`skusync:${P}:alerts`) === '100-0', 'the position follows the page');
  await client.close();
  // the process restarts: its dedupe memory is empty, the stored position is past a1
  broker = new FakeBroker();
  log = start({ storage: store });
  await waitFor(() => broker.client, 'connect');
  const again = nextCatchUp(client);
  broker.up();
  await again;
  assert.deepEqual(log.alerts, [], 'a1 is not reported twice');
});
