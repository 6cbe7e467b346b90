// The client with the real mqtt.js (loaded by the default connect) against a real
// Mosquitto: MQTT 5 properties as mqtt.js reports them (content type, user properties on
// an empty retained payload), and a broker restart that loses every retained message, so
// only the catch-up can bring back what changed meanwhile. Skipped without mosquitto.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import mqtt from 'mqtt';
import { createClient } from '../build/index.js';
import { FakeApi, rev, state, alert, json, cbor, waitFor, nextCatchUp } from './helpers.mjs';

const bin = ['/usr/sbin/mosquitto', '/usr/bin/mosquitto', '/usr/local/sbin/mosquitto'].find((p) => existsSync(p));
const P = 'shop';
const dir = mkdtempSync(path.join(os.tmpdir(), 'skusync-js-mosquitto-'));
let broker = null;
const cleanups = [];
after(async () => {
  for (const f of cleanups.reverse()) await f();
  stopBroker();
  rmSync(dir, { recursive: true, force: true });
});

async function freePort() {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

async function startBroker(port) {
  const conf = path.join(dir, 'mosquitto.conf');
  writeFileSync(conf, [`listener ${port} 127.0.0.1`, 'allow_anonymous true', 'persistence false',
    `user ${os.userInfo().username}`, 'log_dest none', ''].join('\n'));
  broker = spawn(bin, ['-c', conf], { stdio: 'ignore' });
  const probe = () => new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    s.once('connect', () => { s.destroy(); resolve(true); });
    s.once('error', () => resolve(false));
  });
  for (let i = 0; !(await probe()); i++) {
    if (i === 100 || broker.exitCode !== null) throw new Error('mosquitto did not start');
    await new Promise((r) => setTimeout(r, 50));
  }
}

function stopBroker() {
  if (broker && broker.exitCode === null) broker.kill('SIGKILL');
  broker = null;
}

// skusync's side: publishes with the MQTT 5 properties of docs/mobile.md
function publisher(url) {
  const pub = mqtt.connect(url, { protocolVersion: 5, reconnectPeriod: 100 });
  const send = (topic, payload, properties, retain) => new Promise((resolve, reject) =>
    pub.publish(topic, Buffer.from(payload), { qos: 1, retain, properties }, (e) => (e ? reject(e) : resolve())));
  return {
    ready: new Promise((r) => pub.once('connect', r)),
    state: (level, s, format = 'json') => send(`${P}/sku/${level}`, format === 'cbor' ? cbor(s) : json(s),
      { contentType: `application/${format}`, payloadFormatIndicator: format === 'json', userProperties: { rev: s.rev } }, true),
    gone: (level, r) => send(`${P}/sku/${level}`, new Uint8Array(0), { userProperties: { rev: r } }, true),
    alert: (level, a) => send(`${P}/alerts/${level}`, json(a),
      { contentType: 'application/json', payloadFormatIndicator: true, userProperties: { seq: a.seq }, messageExpiryInterval: 3600 }, false),
    end: () => new Promise((r) => pub.end(true, {}, r)),
  };
}

test('real mqtt.js and mosquitto: properties, gone, alerts, and a broker restart', { skip: !bin && 'no mosquitto', timeout: 30_000 }, async () => {
  const port = await freePort();
  await startBroker(port);
  const url = `mqtt://127.0.0.1:${port}`;
  const api = new FakeApi();
  const apiUrl = await api.listen();
  cleanups.push(() => api.close());
  let pub = publisher(url);
  cleanups.push(() => pub.end());
  await pub.ready;

  const AB = state('a/b', rev(1), { available: 3 });
  const U = state('ünï', rev(2), { available: 2.5 });
  api.set(AB, U);
  await pub.state('a%2Fb', AB);
  await pub.state('%C3%BCn%C3%AF', U, 'cbor');

  const client = createClient({ mqttUrl: url, apiUrl, prefix: P, mqtt: { reconnectPeriod: 100 }, retry: { minMs: 20, maxMs: 100 } });
  cleanups.push(() => client.close());
  const states = [];
  const alerts = [];
  const errors = [];
  const conn = [];
  client.onState((sku, s) => states.push([sku, s?.rev ?? null]));
  client.onAlert((a) => alerts.push(a.id));
  client.onError((e) => errors.push(e.message));
  client.onConnection((c) => conn.push(c));
  await nextCatchUp(client);
  await waitFor(() => client.states().size === 2, 'two retained states');
  assert.deepEqual(client.state('a/b'), AB);
  assert.deepEqual(client.state('ünï'), U, 'CBOR decoded');

  // gone: an empty retained payload with the rev user property
  await pub.gone('a%2Fb', rev(3));
  await waitFor(() => client.state('a/b') === null, 'gone');
  assert.deepEqual(states.at(-1), ['a/b', null]);

  // alerts, delivered twice (at least once): one onAlert
  const a = alert('ünï', '1764061200123-0');
  await pub.alert('%C3%BCn%C3%AF', a);
  await pub.alert('%C3%BCn%C3%AF', a);
  await waitFor(() => alerts.length === 1, 'the alert');
  await new Promise((r) => setTimeout(r, 100));
  assert.deepEqual(alerts, [a.id]);

  // the broker restarts without persistence: every retained message is lost; skusync
  // changed U meanwhile. Only the catch-up knows.
  stopBroker();
  await waitFor(() => conn.at(-1) === 'offline', 'offline');
  const U2 = state('ünï', rev(5), { available: 1 }, { base: U.rev });
  api.set(U2);
  const a2 = alert('ünï', '1764061200999-0', 'out_of_stock');
  api.alerts.push(a, a2);
  const caughtUp = nextCatchUp(client, 10_000);
  await startBroker(port);
  await caughtUp;
  assert.equal(client.state('ünï').rev, U2.rev);
  assert.equal(client.state('ünï').available, 1);
  assert.deepEqual(alerts, [a.id, a2.id], 'the alert seen over MQTT is not delivered again');
  assert.equal(client.state('a/b'), null);
  assert.deepEqual(errors.filter((e) => !/ECONNREFUSED/.test(e)), [], 'only refused reconnects');

  // and live again after the restart
  await pub.end();
  pub = publisher(url);
  await pub.ready;
  const U3 = state('ünï', rev(6), { available: 0 }, { base: U2.rev, delta: { available: -1 } });
  await pub.state('%C3%BCn%C3%AF', U3);
  await waitFor(() => client.state('ünï')?.rev === U3.rev, 'live after restart');
});
